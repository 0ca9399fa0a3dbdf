//! Topic creation and deletion through Kafka's admin API, one topic per request.
//!
//! Why not one request for all of them: librdkafka puts the results of CreateTopics and
//! DeleteTopics in the order the topics were requested, and leaves an empty (NULL) slot
//! for a requested topic that the broker's answer does not mention. Kafka answers a
//! topic requested twice only once, so a request for `[a, a, b]` comes back as
//! `[a, NULL, b]`; rdkafka 0.39 reads every slot without a check, and the process dies
//! with SIGSEGV in `rd_kafka_topic_result_name`. With one topic per request a hole
//! cannot happen whatever the broker answers (a request answered with no topic at all
//! is an empty list, reported here as a failure for that topic). Duplicates are dropped
//! first; the requests run concurrently, so this costs a start-up no round trips.

use std::collections::HashSet;

use futures::future::join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicResult};
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaResult, RDKafkaErrorCode};

/// Creates `topics` (each name once), one request per topic, and returns one result per
/// distinct name, in the order given. The error is that of the first request that got
/// no answer at all (a topic-level failure, `TopicAlreadyExists` say, is a result).
pub async fn create_topics<C: ClientContext + 'static>(
    admin: &AdminClient<C>,
    topics: &[NewTopic<'_>],
    options: &AdminOptions,
) -> KafkaResult<Vec<TopicResult>> {
    let mut seen = HashSet::new();
    let distinct: Vec<&NewTopic<'_>> = topics.iter().filter(|t| seen.insert(t.name)).collect();
    let answers = join_all(
        distinct
            .iter()
            .map(|topic| admin.create_topics(std::iter::once(*topic), options)),
    )
    .await;
    one_result_each(distinct.iter().map(|t| t.name), answers)
}

/// Deletes topics `names` (each once), one request per topic; results as for
/// [`create_topics`] (a missing topic is `UnknownTopicOrPartition`).
pub async fn delete_topics<C: ClientContext + 'static>(
    admin: &AdminClient<C>,
    names: &[&str],
    options: &AdminOptions,
) -> KafkaResult<Vec<TopicResult>> {
    let mut seen = HashSet::new();
    let distinct: Vec<&str> = names.iter().copied().filter(|n| seen.insert(*n)).collect();
    let answers = join_all(
        distinct
            .iter()
            .map(|name| admin.delete_topics(std::slice::from_ref(name), options)),
    )
    .await;
    one_result_each(distinct.iter().copied(), answers)
}

/// The single result of each one-topic request; an answer that does not name its topic
/// is a failure of that topic rather than a result that goes missing.
fn one_result_each<'a>(
    names: impl Iterator<Item = &'a str>,
    answers: Vec<KafkaResult<Vec<TopicResult>>>,
) -> KafkaResult<Vec<TopicResult>> {
    names
        .zip(answers)
        .map(|(name, answer)| {
            let mut results = answer?;
            Ok(match results.len() {
                1 => results.remove(0),
                _ => Err((name.to_owned(), RDKafkaErrorCode::Fail)),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::KafkaError;

    #[test]
    fn each_name_gets_exactly_one_result_in_order() {
        let answers = vec![
            Ok(vec![Ok("a".to_owned())]),
            Ok(vec![]),
            Ok(vec![Err((
                "c".to_owned(),
                RDKafkaErrorCode::TopicAlreadyExists,
            ))]),
        ];
        assert_eq!(
            one_result_each(["a", "b", "c"].into_iter(), answers),
            Ok(vec![
                Ok("a".to_owned()),
                Err(("b".to_owned(), RDKafkaErrorCode::Fail)),
                Err(("c".to_owned(), RDKafkaErrorCode::TopicAlreadyExists)),
            ])
        );
    }

    #[test]
    fn a_request_without_an_answer_is_the_error() {
        let answers = vec![Ok(vec![Ok("a".to_owned())]), Err(KafkaError::Canceled)];
        assert_eq!(
            one_result_each(["a", "b"].into_iter(), answers),
            Err(KafkaError::Canceled)
        );
    }
}
