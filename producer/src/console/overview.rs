//! `GET /queues`: what the broker says about each allow-listed queue.
//!
//! - **RabbitMQ**: one request to the management HTTP API per sample
//!   (`/api/queues/{vhost}` filtered by a regular expression to `Q`, `Q.dlq` and
//!   `Q.retry.*` of every queue, one page): ready and unacked of `Q`, its consumers and
//!   acks; messages in `Q.dlq` and published to it; messages in the retry tiers. The
//!   management API refreshes its figures every few seconds
//!   (`collect_statistics_interval`), so depths trail by as much.
//! - **Kafka**: the consumer group of `Q` (`JOBGATE_KAFKA_GROUP`): its committed
//!   offsets against the high watermarks (lag), its members; `Q.dlq` against the dlq
//!   tools' replay group (what `consumer dlq list` would show); the retry topics
//!   against the retry forwarder's group. Clients are made once per group and kept
//!   (they never join the group: no subscription, no rebalance).
//!
//! One sample serves every caller for [`SAMPLE_TTL`]: a console left open in ten tabs
//! asks the broker once a second, not ten times. Each broker call is bounded by
//! [`CALL_TIMEOUT`]; a queue that could not be sampled has `error` set.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use jobgate_shared::broker::dlq_name;
use jobgate_shared::broker::rabbitmq::ManagementDefaults;
use jobgate_shared::config::{Backend, BrokerArgs, SecretUrl};
use jobgate_shared::dlq::replay_group;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

/// How long one sample is served before the broker is asked again.
pub const SAMPLE_TTL: Duration = Duration::from_secs(1);
/// Bound of one broker call (an HTTP request, a Kafka metadata or offsets request).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET /queues`'s answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QueuesOverview {
    /// `rabbitmq` or `kafka`.
    pub backend: &'static str,
    /// When the broker was asked (RFC 3339).
    pub sampled_at: String,
    /// In the order of `JOBGATE_QUEUES`.
    pub queues: Vec<QueueOverview>,
}

/// One queue in `GET /queues`. A figure the backend does not have is `null`.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct QueueOverview {
    pub name: String,
    /// RabbitMQ: messages waiting for a consumer.
    pub ready: Option<u64>,
    /// RabbitMQ: messages delivered and not yet acknowledged.
    pub unacked: Option<u64>,
    /// Kafka: records of `Q` past the consumer group's committed offsets.
    pub lag: Option<u64>,
    /// Consumers of `Q` (RabbitMQ: channels consuming; Kafka: group members).
    pub consumers: Option<u64>,
    /// Dead jobs waiting in `Q.dlq`.
    pub dead: Option<u64>,
    /// Jobs waiting in the retry tiers `Q.retry.*` for their next attempt.
    pub retrying: Option<u64>,
    /// Counter: jobs this producer accepted for `Q` since it started.
    pub accepted: u64,
    /// Counter: RabbitMQ: acks on `Q`; Kafka: the group's committed offsets, summed.
    pub acked: Option<u64>,
    /// Counter: jobs ever dead-lettered into `Q.dlq`.
    pub dead_lettered: Option<u64>,
    /// Why the broker could not be asked about this queue.
    pub error: Option<String>,
}

impl QueueOverview {
    /// A queue the sample has nothing on: only the sample's error.
    pub fn unknown(name: &str, sample: &Sample) -> Self {
        Self {
            name: name.to_owned(),
            error: Some(
                sample
                    .error
                    .clone()
                    .unwrap_or_else(|| "the broker said nothing about this queue".to_owned()),
            ),
            ..Self::default()
        }
    }
}

/// One round of questions to the broker.
#[derive(Debug, Default)]
pub struct Sample {
    pub sampled_at: String,
    pub queues: HashMap<String, QueueOverview>,
    /// Why the whole round failed, when it did.
    pub error: Option<String>,
}

/// Samples the broker; see the module doc.
pub struct Overview {
    source: Source,
    /// The last sample and when it was taken; the lock also makes concurrent callers
    /// wait for one round instead of starting their own.
    last: tokio::sync::Mutex<Option<(Instant, Arc<Sample>)>>,
}

enum Source {
    Rabbitmq(Arc<Management>),
    Kafka(Arc<KafkaOffsets>),
}

impl Overview {
    pub fn new(broker: &BrokerArgs, management_url: Option<&SecretUrl>) -> anyhow::Result<Self> {
        let source = match broker.backend {
            Backend::Rabbitmq => {
                Source::Rabbitmq(Arc::new(Management::new(&broker.amqp(), management_url)?))
            }
            Backend::Kafka => Source::Kafka(Arc::new(KafkaOffsets {
                config: broker.kafka_topics().client_config("console"),
                group_template: broker.kafka_group.clone(),
                clients: Mutex::new(HashMap::new()),
            })),
        };
        Ok(Self {
            source,
            last: tokio::sync::Mutex::new(None),
        })
    }

    /// The latest sample of `queues`, at most [`SAMPLE_TTL`] old.
    pub async fn sample(&self, queues: &[String]) -> Arc<Sample> {
        let mut last = self.last.lock().await;
        if let Some((at, sample)) = last.as_ref() {
            if at.elapsed() < SAMPLE_TTL {
                return Arc::clone(sample);
            }
        }
        let sampled_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let mut sample = match &self.source {
            Source::Rabbitmq(management) => management.sample(queues).await,
            Source::Kafka(kafka) => {
                let (kafka, owned) = (Arc::clone(kafka), queues.to_vec());
                tokio::task::spawn_blocking(move || kafka.sample(&owned))
                    .await
                    .unwrap_or_else(|error| Sample {
                        error: Some(format!("the Kafka client task failed: {error}")),
                        ..Sample::default()
                    })
            }
        };
        sample.sampled_at = sampled_at;
        let sample = Arc::new(sample);
        *last = Some((Instant::now(), Arc::clone(&sample)));
        sample
    }
}

/// The RabbitMQ management HTTP API.
struct Management {
    client: reqwest::Client,
    /// `http://host:15672/`, without user and password.
    base: url::Url,
    user: String,
    password: String,
    vhost: String,
}

/// One queue of `/api/queues` (the fields read; absent ones are missing statistics).
#[derive(Debug, Deserialize)]
struct ManagedQueue {
    name: String,
    #[serde(default)]
    messages: Option<u64>,
    #[serde(default)]
    messages_ready: Option<u64>,
    #[serde(default)]
    messages_unacknowledged: Option<u64>,
    #[serde(default)]
    consumers: Option<u64>,
    #[serde(default)]
    message_stats: Option<MessageStats>,
}

#[derive(Debug, Default, Deserialize)]
struct MessageStats {
    #[serde(default)]
    ack: Option<u64>,
    #[serde(default)]
    publish: Option<u64>,
}

/// A page of `/api/queues?page=...`.
#[derive(Debug, Deserialize)]
struct QueuePage {
    items: Vec<ManagedQueue>,
}

/// Most queues one page of the management API holds (its own maximum).
const PAGE_SIZE: usize = 500;

impl Management {
    fn new(
        amqp: &jobgate_shared::broker::rabbitmq::AmqpEndpoint,
        given: Option<&SecretUrl>,
    ) -> anyhow::Result<Self> {
        let defaults: ManagementDefaults =
            amqp.management_defaults().map_err(anyhow::Error::msg)?;
        let (mut base, user, password) = match given {
            None => (
                url::Url::parse(&defaults.base_url)?,
                defaults.user,
                defaults.password,
            ),
            Some(given) => {
                let parsed = url::Url::parse(given.expose()).map_err(|e| {
                    anyhow::anyhow!("JOBGATE_RABBITMQ_MANAGEMENT_URL is not a URL ({e}): {given}")
                })?;
                anyhow::ensure!(
                    matches!(parsed.scheme(), "http" | "https"),
                    "JOBGATE_RABBITMQ_MANAGEMENT_URL must be http:// or https://: {given}"
                );
                let user = if parsed.username().is_empty() {
                    defaults.user
                } else {
                    percent_decode(parsed.username())
                };
                let password = match parsed.password() {
                    Some(password) => percent_decode(password),
                    None => defaults.password,
                };
                (parsed, user, password)
            }
        };
        // Credentials go in the Authorization header, never in a URL that may be logged.
        let _ = base.set_username("");
        let _ = base.set_password(None);
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let client = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            client,
            base,
            user,
            password,
            vhost: defaults.vhost,
        })
    }

    /// `^(q1|q2)(\.dlq|\.retry\..+)?$`, with the names' dots escaped: only jobgate's
    /// queues of the allow-list, whatever else the vhost holds.
    fn name_filter(queues: &[String]) -> String {
        let names: Vec<String> = queues.iter().map(|q| q.replace('.', "\\.")).collect();
        format!("^({})(\\.dlq|\\.retry\\..+)?$", names.join("|"))
    }

    async fn fetch(&self, queues: &[String]) -> Result<Vec<ManagedQueue>, String> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| "the management URL cannot have a path".to_owned())?
            .pop_if_empty()
            .extend(["api", "queues", &self.vhost]);
        url.query_pairs_mut()
            .append_pair("page", "1")
            .append_pair("page_size", &PAGE_SIZE.to_string())
            .append_pair("use_regex", "true")
            .append_pair("name", &Self::name_filter(queues));
        let shown = self.base.as_str();
        let response = self
            .client
            .get(url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| format!("RabbitMQ management API at {shown}: {}", without_url(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!(
                "RabbitMQ management API at {shown} answered {status}{}",
                match status.as_u16() {
                    401 =>
                        " (set JOBGATE_RABBITMQ_MANAGEMENT_URL with a user that may read queues)",
                    404 => " (is the vhost right, and the management plugin enabled?)",
                    _ => "",
                }
            ));
        }
        let page: QueuePage = response.json().await.map_err(|e| {
            format!(
                "RabbitMQ management API at {shown}: unreadable answer: {}",
                without_url(&e)
            )
        })?;
        Ok(page.items)
    }

    async fn sample(&self, queues: &[String]) -> Sample {
        let items = match self.fetch(queues).await {
            Ok(items) => items,
            Err(error) => {
                tracing::debug!(%error, "console: queue sample failed");
                return Sample {
                    error: Some(error),
                    ..Sample::default()
                };
            }
        };
        let by_name: HashMap<&str, &ManagedQueue> =
            items.iter().map(|q| (q.name.as_str(), q)).collect();
        let mut sample = Sample::default();
        for queue in queues {
            let Some(main) = by_name.get(queue.as_str()) else {
                sample.queues.insert(
                    queue.clone(),
                    QueueOverview {
                        name: queue.clone(),
                        error: Some(format!(
                            "queue {queue} does not exist on RabbitMQ yet (it is declared when the producer's publisher connects)"
                        )),
                        ..QueueOverview::default()
                    },
                );
                continue;
            };
            let dlq = by_name.get(dlq_name(queue).as_str());
            let retry_prefix = format!("{queue}.retry.");
            let retrying = items
                .iter()
                .filter(|q| q.name.starts_with(&retry_prefix))
                .map(|q| q.messages.unwrap_or(0))
                .sum();
            let stats = |q: &ManagedQueue, pick: fn(&MessageStats) -> Option<u64>| {
                q.message_stats.as_ref().and_then(pick).unwrap_or(0)
            };
            sample.queues.insert(
                queue.clone(),
                QueueOverview {
                    name: queue.clone(),
                    ready: Some(main.messages_ready.unwrap_or(0)),
                    unacked: Some(main.messages_unacknowledged.unwrap_or(0)),
                    consumers: Some(main.consumers.unwrap_or(0)),
                    acked: Some(stats(main, |s| s.ack)),
                    dead: dlq.map(|d| d.messages.unwrap_or(0)),
                    dead_lettered: dlq.map(|d| stats(d, |s| s.publish)),
                    retrying: Some(retrying),
                    ..QueueOverview::default()
                },
            );
        }
        sample
    }
}

/// A reqwest error without the URL it carries (its query is long and says nothing).
fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text
            .replace(&format!(" ({url})"), "")
            .replace(url.as_str(), "");
    }
    if error.is_timeout() {
        text = format!("no answer within {CALL_TIMEOUT:?}");
    } else if error.is_connect() {
        text = "cannot connect".to_owned();
    }
    text
}

/// The user or password of a URL as written (`%40` for `@`), decoded.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Kafka offsets and groups.
struct KafkaOffsets {
    config: ClientConfig,
    group_template: String,
    /// One client per consumer group asked about (`committed_offsets` needs the group
    /// in the client's configuration).
    clients: Mutex<HashMap<String, Arc<BaseConsumer>>>,
}

/// Offsets of one topic: per partition, the low and high watermarks.
struct Watermarks(Vec<(i32, i64, i64)>);

impl KafkaOffsets {
    /// The client of `group`; with `""`, one of no group (metadata, watermarks, the
    /// group list).
    fn client(&self, group: &str) -> Result<Arc<BaseConsumer>, String> {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(client) = clients.get(group) {
            return Ok(Arc::clone(client));
        }
        let mut config = self.config.clone();
        config
            .set("enable.auto.commit", "false")
            .set("allow.auto.create.topics", "false");
        if !group.is_empty() {
            config.set("group.id", group);
        }
        let client: BaseConsumer = config.create().map_err(|e| format!("Kafka client: {e}"))?;
        let client = Arc::new(client);
        clients.insert(group.to_owned(), Arc::clone(&client));
        Ok(client)
    }

    fn sample(&self, queues: &[String]) -> Sample {
        let mut sample = Sample::default();
        let any = match self.client("") {
            Ok(client) => client,
            Err(error) => {
                sample.error = Some(error);
                return sample;
            }
        };
        let metadata = match any.fetch_metadata(None, CALL_TIMEOUT) {
            Ok(metadata) => metadata,
            Err(error) => {
                sample.error = Some(format!("Kafka metadata: {error}"));
                return sample;
            }
        };
        let partitions: HashMap<String, Vec<i32>> = metadata
            .topics()
            .iter()
            .map(|t| {
                (
                    t.name().to_owned(),
                    t.partitions().iter().map(|p| p.id()).collect(),
                )
            })
            .collect();
        for queue in queues {
            let overview = self
                .queue(&any, queue, &partitions)
                .unwrap_or_else(|error| QueueOverview {
                    name: queue.clone(),
                    error: Some(error),
                    ..QueueOverview::default()
                });
            sample.queues.insert(queue.clone(), overview);
        }
        sample
    }

    fn watermarks(
        client: &BaseConsumer,
        topic: &str,
        partitions: &HashMap<String, Vec<i32>>,
    ) -> Result<Option<Watermarks>, String> {
        let Some(ids) = partitions.get(topic) else {
            return Ok(None);
        };
        let mut marks = Vec::with_capacity(ids.len());
        for &partition in ids {
            let (low, high) = client
                .fetch_watermarks(topic, partition, CALL_TIMEOUT)
                .map_err(|e| format!("Kafka watermarks of {topic}/{partition}: {e}"))?;
            marks.push((partition, low, high));
        }
        Ok(Some(Watermarks(marks)))
    }

    /// The committed offsets of `group` on `topic`'s partitions (missing: none yet).
    fn committed(
        &self,
        group: &str,
        topic: &str,
        marks: &Watermarks,
    ) -> Result<HashMap<i32, i64>, String> {
        let client = self.client(group)?;
        let mut tpl = TopicPartitionList::new();
        for &(partition, _, _) in &marks.0 {
            tpl.add_partition(topic, partition);
        }
        let committed = client
            .committed_offsets(tpl, CALL_TIMEOUT)
            .map_err(|e| format!("Kafka committed offsets of group {group}: {e}"))?;
        Ok(committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(offset) => Some((e.partition(), offset)),
                _ => None,
            })
            .collect())
    }

    /// Records past `group`'s positions (the low watermark where it has none).
    fn behind(&self, group: &str, topic: &str, marks: &Watermarks) -> Result<(u64, u64), String> {
        let committed = self.committed(group, topic, marks)?;
        let mut lag = 0u64;
        let mut consumed = 0u64;
        for &(partition, low, high) in &marks.0 {
            let position = committed.get(&partition).copied().unwrap_or(low).max(low);
            lag += u64::try_from(high - position).unwrap_or(0);
            consumed += u64::try_from(committed.get(&partition).copied().unwrap_or(0)).unwrap_or(0);
        }
        Ok((lag, consumed))
    }

    fn queue(
        &self,
        any: &BaseConsumer,
        queue: &str,
        partitions: &HashMap<String, Vec<i32>>,
    ) -> Result<QueueOverview, String> {
        let group = self.group_template.replace("{queue}", queue);
        let Some(main) = Self::watermarks(any, queue, partitions)? else {
            return Err(format!(
                "topic {queue} does not exist on Kafka yet (it is created when the producer's publisher connects)"
            ));
        };
        let (lag, acked) = self.behind(&group, queue, &main)?;
        let consumers = any
            .fetch_group_list(Some(&group), CALL_TIMEOUT)
            .map_err(|e| format!("Kafka group {group}: {e}"))?
            .groups()
            .iter()
            .map(|g| g.members().len() as u64)
            .sum();
        let dlq = dlq_name(queue);
        let (dead, dead_lettered) = match Self::watermarks(any, &dlq, partitions)? {
            Some(marks) => {
                let (dead, _) =
                    self.behind(&replay_group(&self.group_template, queue), &dlq, &marks)?;
                let ever = marks
                    .0
                    .iter()
                    .map(|&(_, _, high)| u64::try_from(high).unwrap_or(0))
                    .sum();
                (Some(dead), Some(ever))
            }
            None => (None, None),
        };
        let retry_group = format!("{group}.retry");
        let retry_prefix = format!("{queue}.retry.");
        let mut retrying = 0u64;
        for topic in partitions.keys().filter(|t| t.starts_with(&retry_prefix)) {
            if let Some(marks) = Self::watermarks(any, topic, partitions)? {
                retrying += self.behind(&retry_group, topic, &marks)?.0;
            }
        }
        Ok(QueueOverview {
            name: queue.to_owned(),
            lag: Some(lag),
            consumers: Some(consumers),
            acked: Some(acked),
            dead,
            dead_lettered,
            retrying: Some(retrying),
            ..QueueOverview::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_filter_matches_only_the_queues_and_their_dlq_and_tiers() {
        let filter = Management::name_filter(&["jobs".to_owned(), "mail.eu".to_owned()]);
        assert_eq!(filter, r"^(jobs|mail\.eu)(\.dlq|\.retry\..+)?$");
    }

    #[test]
    fn percent_encoded_credentials_are_decoded() {
        assert_eq!(percent_decode("p%40ss%3Aw"), "p@ss:w");
        assert_eq!(percent_decode("a+b"), "a+b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("plain"), "plain");
    }
}
