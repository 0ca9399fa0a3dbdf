//! `--big-batches`: the producer's peak resident memory (`VmHWM`) while 16 clients at
//! once send 10 MiB batches of `[0,0,0,...]` (about 5 million items each, far past
//! `JOBGATE_MAX_BATCH_ITEMS`), several rounds. Each is refused with 413 once its item
//! count passes the limit, before the rest of its body is read (issue 13: it was parsed
//! whole first, about 130 MB a request). Goal: the peak stays under 64 MiB.

use anyhow::Result;

use super::{say, Bench, STOP_GRACE};

/// Clients at once.
const CLIENTS: usize = 16;
/// Rounds of `CLIENTS` requests.
const ROUNDS: usize = 4;
/// Size of each batch body.
const BATCH_BYTES: usize = 10 * 1024 * 1024;
/// The peak the producer should stay under, in MiB.
pub(super) const GOAL_MIB: f64 = 64.0;

/// What one backend's producer did.
pub(super) struct BigBatches {
    pub backend: &'static str,
    /// `VmHWM` once ready, and after the rounds, in KiB.
    pub peak_before_kib: u64,
    pub peak_after_kib: u64,
    /// Answers by status; requests the producer cut off (it stops reading a refused
    /// body and closes the connection, which a client still sending may see as a
    /// reset instead of the 413).
    pub statuses: std::collections::BTreeMap<u16, usize>,
    pub cut_off: usize,
}

impl BigBatches {
    pub(super) fn peak_mib(&self) -> f64 {
        self.peak_after_kib as f64 / 1024.0
    }

    pub(super) fn line(&self) -> String {
        format!(
            "{}: producer peak RSS (VmHWM) {:.1} MiB after {ROUNDS} rounds of {CLIENTS} concurrent \
             {} MiB [0,0,...] batches ({:.1} MiB once ready); answers {:?}, cut off {} (goal: under {GOAL_MIB} MiB)",
            self.backend,
            self.peak_mib(),
            BATCH_BYTES / (1024 * 1024),
            self.peak_before_kib as f64 / 1024.0,
            self.statuses,
            self.cut_off,
        )
    }
}

/// `[0,0,...,0]` of exactly `bytes` bytes (`bytes` odd, at least 3).
fn zeros_array(bytes: usize) -> bytes::Bytes {
    let mut body = Vec::with_capacity(bytes);
    body.push(b'[');
    while body.len() + 2 < bytes {
        body.extend_from_slice(b"0,");
    }
    body.extend_from_slice(b"0]");
    bytes::Bytes::from(body)
}

impl Bench<'_> {
    pub(super) async fn big_batches(&self) -> Result<BigBatches> {
        let q = self.queue("bigbatch");
        self.create(&q).await?;
        let (mut producer, base) = self.start_producer(&q, "bigbatch", &[]).await?;
        let peak_before_kib = producer.peak_rss_kib()?;
        let body = zeros_array(BATCH_BYTES);
        let url = format!("{base}/jobs/{q}/batch");
        let mut statuses = std::collections::BTreeMap::new();
        let mut cut_off = 0;
        for _ in 0..ROUNDS {
            let posts = (0..CLIENTS).map(|_| {
                self.http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
            });
            for answer in futures::future::join_all(posts).await {
                match answer {
                    Ok(response) => *statuses.entry(response.status().as_u16()).or_insert(0) += 1,
                    Err(_) => cut_off += 1,
                }
            }
            producer.check_alive()?;
        }
        let peak_after_kib = producer.peak_rss_kib()?;
        producer.stop(STOP_GRACE).await?;
        self.drop_queue(&q).await?;
        let result = BigBatches {
            backend: self.backend,
            peak_before_kib,
            peak_after_kib,
            statuses,
            cut_off,
        };
        say(result.line());
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_body_is_a_json_array_of_the_size_asked() {
        let body = super::zeros_array(1001);
        assert_eq!(body.len(), 1001);
        let items: Vec<u8> = serde_json::from_slice(&body).unwrap();
        assert_eq!(items.len(), 500);
    }
}
