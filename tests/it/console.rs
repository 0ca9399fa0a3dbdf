//! The web console (issue 17) in a real browser: headless Chromium ([`Browser`])
//! against the real `producer` and `consumer` binaries, Redis and both brokers. Sign-in
//! with a wrong and a right key; a queue's depth rising with POSTs and falling when a
//! consumer drains it; a job looked up by id; a dead job listed with its reason and
//! replayed by an admin (a reader sees the buttons disabled and gets 403 from the API);
//! a job body full of markup shown as text; and the Content-Security-Policy on the
//! console's files.
//!
//! Every wait is a poll with a generous deadline: no assertion depends on timing. With
//! `JOBGATE_SCREENSHOTS_DIR` set, the RabbitMQ runs save `queues.png`, `job.png` and
//! `dead-letters.png` there (`scripts/screenshots.sh`, for the README).

use std::time::Duration;

use serde_json::{json, Value};

use crate::browser::Browser;
use crate::helpers::{brokers_shared, unique, vars, wait_until, Backend, Consumer, Producer};

const REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Of `JOBGATE_ADMIN_KEYS`: may replay and purge dead jobs, and read any job.
const ADMIN: &str = "console-admin-key-0123456789";
/// Of `JOBGATE_API_KEYS`: may read, and send jobs.
const READER: &str = "console-reader-key-0123456789";
const LIMIT: Duration = Duration::from_secs(120);
/// The policy every console file is served with.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
/// A job body that runs script wherever it is put into a page as markup.
const XSS: &str =
    r#"<img src=x onerror="document.title='pwned'"><script>document.title='pwned'</script>"#;

on_both_backends!(
    signing_in_needs_a_key_the_producer_accepts,
    a_queues_depth_rises_with_posts_and_falls_when_a_consumer_drains_it,
    a_job_looked_up_by_id_shows_its_state_and_timeline,
    a_dead_job_is_listed_with_its_reason_and_only_an_admin_replays_it,
    a_job_body_with_markup_is_shown_as_text_and_runs_nothing,
    the_console_is_served_with_a_content_security_policy,
);

/// A producer for `queue` with a reader key, an admin key and the status store.
async fn console_producer(backend: Backend, queue: &str) -> Producer {
    Producer::start(
        backend,
        &[queue],
        &vars(&[
            ("JOBGATE_API_KEYS", READER),
            ("JOBGATE_ADMIN_KEYS", ADMIN),
            ("JOBGATE_REDIS_URL", REDIS_URL),
        ]),
    )
    .await
}

/// POSTs `body` to `queue` with `key`; returns the job id of the 202.
async fn post_as(producer: &Producer, key: &str, queue: &str, body: &str) -> String {
    let response = producer
        .http
        .post(producer.url(&format!("/jobs/{queue}")))
        .bearer_auth(key)
        .body(body.to_owned())
        .send()
        .await
        .expect("POST reaches the producer");
    assert_eq!(response.status(), 202, "POST /jobs/{queue}");
    let answer: Value = response.json().await.expect("a JSON answer");
    answer["job_id"].as_str().expect("a job_id").to_owned()
}

/// A consumer whose every attempt fails (`sh` echoes the body to stderr, so it is in the
/// reason) and whose jobs die after their first attempt.
async fn failing_consumer(backend: Backend, queue: &str) -> Consumer {
    Consumer::start(
        backend,
        queue,
        &vars(&[
            ("JOBGATE_HANDLER", "exec"),
            (
                "JOBGATE_EXEC_COMMAND",
                r#"sh -c 'printf "disk on fire: " >&2; cat >&2; exit 3'"#,
            ),
            ("JOBGATE_MAX_ATTEMPTS", "1"),
            ("JOBGATE_REDIS_URL", REDIS_URL),
        ]),
    )
    .await
}

/// Waits until `consumer` dead-lettered every job of `ids`.
async fn wait_dead(consumer: &Consumer, ids: &[&str]) {
    for id in ids {
        wait_until(LIMIT, &format!("{id} to be dead-lettered"), || {
            let dead = consumer
                .process
                .lines("job failed for good; dead-lettered")
                .iter()
                .any(|l| l["job_id"] == *id);
            std::future::ready(dead)
        })
        .await;
    }
}

/// Opens the console of `producer` and signs in with `key`; returns once the queues
/// page shows who signed in.
async fn sign_in(browser: &Browser, producer: &Producer, key: &str) {
    browser.open(&producer.url("/ui")).await;
    browser.until_visible("#signin").await;
    browser.fill("#api-key", key).await;
    browser.click("#signin-submit").await;
    browser.until_visible("#page-queues").await;
    browser
        .until_text("#whoami", "the role", |t| !t.is_empty())
        .await;
}

fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Rabbitmq => "rabbitmq",
        Backend::Kafka => "kafka",
    }
}

/// The cell `field` of the row of `queue` on the queues page.
fn queue_cell(queue: &str, field: &str) -> String {
    format!(r#"#queues-table tr[data-queue="{queue}"] td[data-field="{field}"]"#)
}

/// The row of dead job `id` on the dead-letters page.
fn dead_row(id: &str) -> String {
    format!(r#"#dead-table tr[data-job-id="{id}"]"#)
}

/// Goes to the dead-letters page and refreshes it until the row of `id` is there.
async fn until_dead_row(browser: &Browser, id: &str) {
    browser.click("#nav-dead").await;
    browser.until_visible("#page-dead").await;
    let row = dead_row(id);
    browser
        .until(&format!("the dead job {id} to be listed"), || async {
            if browser.count(&row).await == 1 {
                return Some(());
            }
            browser.click("#dead-refresh").await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            None
        })
        .await;
}

pub async fn signing_in_needs_a_key_the_producer_accepts(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("console-signin");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = console_producer(backend, &queue).await;
    let browser = Browser::start().await;

    browser.open(&producer.url("/ui")).await;
    browser.until_visible("#signin").await;
    assert!(!browser.visible("#signin-error").await);
    // The stylesheet applied under the CSP (the script did: it showed the form).
    let display = browser
        .eval(
            "return getComputedStyle(document.querySelector('.topbar')).display;",
            vec![],
        )
        .await;
    assert_eq!(display, "flex", "app.css is applied");

    // A wrong key: refused, and nothing is kept.
    browser.fill("#api-key", "not-a-key-of-this-producer").await;
    browser.click("#signin-submit").await;
    browser.until_visible("#signin-error").await;
    let error = browser.text("#signin-error").await.unwrap_or_default();
    assert!(error.contains("401"), "{error}");
    assert!(!browser.visible("#page-queues").await);
    assert!(!browser.visible("#nav-queues").await);
    let kept = browser
        .eval("return sessionStorage.getItem('jobgate.key');", vec![])
        .await;
    assert_eq!(kept, Value::Null);

    // The admin key: the queues page, who is signed in, and the queue's row.
    browser.fill("#api-key", ADMIN).await;
    browser.click("#signin-submit").await;
    browser.until_visible("#page-queues").await;
    assert!(!browser.visible("#signin-error").await);
    let whoami = browser
        .until_text("#whoami", "the role", |t| !t.is_empty())
        .await;
    assert!(
        whoami.contains("admin") && whoami.contains(backend_name(backend)),
        "{whoami}"
    );
    let hash = browser.eval("return location.hash;", vec![]).await;
    assert_eq!(hash, "#/queues");
    browser
        .until_text(&queue_cell(&queue, "accepted-rate"), "a cell", |_| true)
        .await;

    // The key is in this tab's session storage only: no local storage, no cookie.
    let storage = browser
        .eval(
            "return [sessionStorage.getItem('jobgate.key'), localStorage.length, document.cookie];",
            vec![],
        )
        .await;
    assert_eq!(storage, json!([ADMIN, 0, ""]));

    // A reload keeps the session; signing out forgets the key.
    browser.reload().await;
    browser.until_visible("#page-queues").await;
    assert!(browser.visible("#whoami").await);
    browser.click("#signout").await;
    browser.until_visible("#signin").await;
    assert!(!browser.visible("#page-queues").await);
    let kept = browser
        .eval("return sessionStorage.getItem('jobgate.key');", vec![])
        .await;
    assert_eq!(kept, Value::Null);

    // A reader key signs in as a reader.
    browser.fill("#api-key", READER).await;
    browser.click("#signin-submit").await;
    let whoami = browser
        .until_text("#whoami", "the reader role", |t| t.contains("reader"))
        .await;
    assert!(whoami.contains(backend_name(backend)), "{whoami}");

    // A producer without keys answers loopback clients without one: the empty key signs
    // in (as an admin, like RabbitMQ's guest). When that producer goes away, the page
    // says its polls fail.
    let mut keyless = Producer::start(backend, &[&queue], &[]).await;
    browser.open(&keyless.url("/ui")).await;
    browser.until_visible("#signin").await;
    browser.fill("#api-key", "").await;
    browser.click("#signin-submit").await;
    browser.until_visible("#page-queues").await;
    browser
        .until_text("#whoami", "the admin role", |t| t.contains("admin"))
        .await;
    browser
        .until_text(&queue_cell(&queue, "consumers"), "a cell", |_| true)
        .await;
    assert!(!browser.visible("#queues-error").await);
    keyless.process.terminate();
    keyless.process.wait_exit(Duration::from_secs(30)).await;
    browser.until_visible("#queues-error").await;
    browser.close().await;
}

pub async fn a_queues_depth_rises_with_posts_and_falls_when_a_consumer_drains_it(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("console-depth");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = console_producer(backend, &queue).await;
    let browser = Browser::start().await;
    sign_in(&browser, &producer, ADMIN).await;

    // RabbitMQ counts ready messages; Kafka the group's lag.
    let depth = queue_cell(
        &queue,
        match backend {
            Backend::Rabbitmq => "ready",
            Backend::Kafka => "lag",
        },
    );
    browser.until_visible(&depth).await;
    for n in 0..5 {
        post_as(&producer, ADMIN, &queue, &format!("{{\"n\":{n}}}")).await;
    }
    browser
        .until_text(&depth, "a depth of 5", |t| t == "5")
        .await;
    // The rate of accepted jobs is derived from two samples: a number by now.
    browser
        .until_text(&queue_cell(&queue, "accepted-rate"), "a rate", |t| {
            t.parse::<f64>().is_ok()
        })
        .await;

    let consumer = Consumer::start(backend, &queue, &[]).await;
    browser
        .until_text(&depth, "a depth of 0", |t| t == "0")
        .await;
    if backend == Backend::Rabbitmq {
        browser
            .until_text(&queue_cell(&queue, "unacked"), "0 unacked", |t| t == "0")
            .await;
    }
    browser
        .until_text(&queue_cell(&queue, "acked-rate"), "a rate", |t| {
            t.parse::<f64>().is_ok()
        })
        .await;
    assert_eq!(consumer.processed().len(), 5);
    // The row's chart has drawn the samples (its title sums up the last one).
    let chart = format!(r#"canvas[data-chart="{queue}"]"#);
    let summary = browser
        .until("the chart of the queue", || async {
            browser
                .attr(&chart, "title")
                .await
                .filter(|t| t.starts_with("depth 0"))
        })
        .await;
    assert!(summary.contains("max 5"), "{summary}");
    assert!(!browser.visible("#queues-error").await);
    if backend == Backend::Rabbitmq && Browser::screenshots_wanted() {
        // For the README: half a minute of bursts, so the chart shows some history.
        for burst in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            for n in 0..4 * (burst + 1) {
                post_as(
                    &producer,
                    ADMIN,
                    &queue,
                    &format!("{{\"burst\":{burst},\"n\":{n}}}"),
                )
                .await;
            }
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
        browser.screenshot("queues.png").await;
    }
    browser.close().await;
}

pub async fn a_job_looked_up_by_id_shows_its_state_and_timeline(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("console-job");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = console_producer(backend, &queue).await;
    let _consumer =
        Consumer::start(backend, &queue, &vars(&[("JOBGATE_REDIS_URL", REDIS_URL)])).await;
    // Sent with the reader key, looked up with the admin key (which may read any job).
    let id = post_as(&producer, READER, &queue, r#"{"report":"weekly"}"#).await;
    let browser = Browser::start().await;
    sign_in(&browser, &producer, ADMIN).await;

    browser.click("#nav-job").await;
    browser.until_visible("#page-job").await;
    let chosen = browser
        .eval("return document.getElementById('job-queue').value;", vec![])
        .await;
    assert_eq!(chosen, queue.as_str(), "the queues of /me are offered");
    browser.fill("#job-id", &id).await;
    browser.click("#job-lookup").await;
    // A job not final yet is followed on screen until it is.
    browser
        .until_text("#job-state", "done", |t| t == "done")
        .await;
    assert!(!browser.visible("#job-message").await);
    // One entry per known time, in time order (the page sorts them: the times come from
    // the producer and the consumers; the store never puts a creation after a start).
    let timeline = browser
        .eval(
            "return [...document.querySelectorAll('#job-timeline li')].map(li => \
             [li.dataset.event, li.querySelector('time').getAttribute('datetime')]);",
            vec![],
        )
        .await;
    let timeline: Vec<(String, String)> =
        serde_json::from_value(timeline).expect("(event, time) pairs");
    let events: Vec<&str> = timeline.iter().map(|(e, _)| e.as_str()).collect();
    let times: Vec<&str> = timeline.iter().map(|(_, t)| t.as_str()).collect();
    assert!(times.is_sorted(), "in time order: {timeline:?}");
    assert_eq!(events, ["created", "started", "finished"], "{timeline:?}");
    assert_eq!(
        browser
            .text("#job-attempts")
            .await
            .as_deref()
            .map(str::trim),
        Some("1")
    );
    assert!(browser.visible("#job-result-body").await);
    if backend == Backend::Rabbitmq {
        browser.screenshot("job.png").await;
    }

    // An id nobody sent: the 404 in words, no stale result.
    browser.fill("#job-id", "no-such-job").await;
    browser.click("#job-lookup").await;
    let message = browser
        .until_text("#job-message", "the 404", |t| t.contains("404"))
        .await;
    assert!(message.contains("no-such-job"), "{message}");
    assert!(!browser.visible("#job-result").await);

    // A producer without a status store: its 501 problem's detail.
    let bare = Producer::start(
        backend,
        &[&queue],
        &vars(&[("JOBGATE_API_KEYS", READER), ("JOBGATE_ADMIN_KEYS", ADMIN)]),
    )
    .await;
    let problem: Value = bare
        .http
        .get(bare.url(&format!("/jobs/{queue}/{id}")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("GET the status")
        .json()
        .await
        .expect("a problem");
    assert_eq!(problem["status"], 501, "{problem}");
    let detail = problem["detail"].as_str().expect("a detail").to_owned();
    sign_in(&browser, &bare, ADMIN).await;
    browser.click("#nav-job").await;
    browser.until_visible("#page-job").await;
    browser.fill("#job-id", &id).await;
    browser.click("#job-lookup").await;
    browser
        .until_text("#job-message", "the 501's detail", |t| t.contains(&detail))
        .await;
    browser.close().await;
}

pub async fn a_dead_job_is_listed_with_its_reason_and_only_an_admin_replays_it(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("console-dead");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = console_producer(backend, &queue).await;
    // One dead job first, alone in the dead-letter queue (on Kafka a job replayed by id
    // leaves the list only when nothing before it on its partition stays).
    let mut failing = failing_consumer(backend, &queue).await;
    let a = post_as(&producer, ADMIN, &queue, "job a").await;
    wait_dead(&failing, &[&a]).await;
    // No consumer for a while: the replayed job stays on the queue, to be counted.
    failing.process.terminate();
    assert_eq!(
        failing.process.wait_exit(Duration::from_secs(30)).await,
        Some(0)
    );
    wait_until(LIMIT, "an empty queue", || async {
        backend.pending(&queue).await == 0
    })
    .await;

    // A reader sees the dead job, with the admin's buttons disabled...
    let browser = Browser::start().await;
    sign_in(&browser, &producer, READER).await;
    until_dead_row(&browser, &a).await;
    let row = dead_row(&a);
    let cell = |field: &str| format!(r#"{row} td[data-field="{field}"]"#);
    let reason = browser.text(&cell("reason")).await.unwrap_or_default();
    assert!(
        reason.contains("status 3") && reason.contains("disk on fire: job a"),
        "{reason}"
    );
    assert_eq!(browser.text(&cell("attempts")).await.as_deref(), Some("1"));
    let failed_at = browser.text(&cell("failed-at")).await.unwrap_or_default();
    assert!(failed_at.starts_with("20"), "a date: {failed_at}");
    assert_eq!(browser.text(&cell("body")).await.as_deref(), Some("job a"));
    assert_eq!(
        browser.text(&cell("job-id")).await.as_deref(),
        Some(a.as_str())
    );
    for button in [
        "#dead-replay-all".to_owned(),
        "#dead-purge".to_owned(),
        format!(r#"{row} button[data-action="replay"]"#),
    ] {
        assert!(!browser.enabled(&button).await, "{button} is disabled");
        let title = browser.attr(&button, "title").await.unwrap_or_default();
        assert!(title.contains("admin key"), "{button}: {title:?}");
    }
    // ...and the API refuses them to a reader.
    let replay = producer.url(&format!("/queues/{queue}/dead/replay"));
    for request in [
        producer.http.post(&replay).json(&json!({})),
        producer.http.post(&replay).json(&json!({ "job_id": a })),
        producer
            .http
            .delete(producer.url(&format!("/queues/{queue}/dead?confirm={queue}"))),
    ] {
        let response = request.bearer_auth(READER).send().await.expect("an answer");
        assert_eq!(response.status(), 403);
        let problem: Value = response.json().await.expect("a problem");
        let kind = problem["type"].as_str().unwrap_or_default();
        assert!(kind.ends_with("admin-only"), "{problem}");
    }
    browser.click("#signout").await;

    // An admin replays it from its row: it leaves the list, and is on the queue again.
    sign_in(&browser, &producer, ADMIN).await;
    until_dead_row(&browser, &a).await;
    browser
        .click(&format!(r#"{row} button[data-action="replay"]"#))
        .await;
    browser
        .until_text("#dead-message", "the replay", |t| {
            t.contains("Replayed 1 job")
        })
        .await;
    browser
        .until("the replayed job to leave the list", || async {
            (browser.count(&row).await == 0).then_some(())
        })
        .await;
    wait_until(LIMIT, "the replayed job to be on the queue", || async {
        backend.pending(&queue).await == 1
    })
    .await;

    // Two more die (and the replayed one again): three dead jobs.
    let failing = failing_consumer(backend, &queue).await;
    let b = post_as(&producer, ADMIN, &queue, "job b").await;
    let c = post_as(&producer, ADMIN, &queue, "job c").await;
    wait_dead(&failing, &[&a, &b, &c]).await;
    for id in [&a, &b, &c] {
        until_dead_row(&browser, id).await;
    }
    browser
        .until_text("#dead-total", "3 dead jobs", |t| {
            t.starts_with("3 dead jobs")
        })
        .await;
    if backend == Backend::Rabbitmq {
        browser.screenshot("dead-letters.png").await;
    }

    // Replay all asks first; "no" changes nothing.
    browser.click("#dead-replay-all").await;
    browser.until_visible("#confirm-dialog").await;
    let question = browser.text("#confirm-text").await.unwrap_or_default();
    assert!(question.contains("3 dead jobs"), "{question}");
    browser.click("#confirm-no").await;
    browser
        .until("the dialog to close", || async {
            (!browser.visible("#confirm-dialog").await).then_some(())
        })
        .await;
    browser.click("#dead-refresh").await;
    for id in [&a, &b, &c] {
        until_dead_row(&browser, id).await;
    }

    // Purge asks too; "yes" deletes them for good.
    browser.click("#dead-purge").await;
    browser.until_visible("#confirm-dialog").await;
    browser.click("#confirm-yes").await;
    browser
        .until_text("#dead-message", "the purge", |t| {
            t.contains("Purged 3 jobs")
        })
        .await;
    browser
        .until("an empty list", || async {
            (browser.count("#dead-table tr[data-job-id]").await == 0).then_some(())
        })
        .await;
    assert!(
        crate::helpers::dlq::list(backend, &queue).await.is_empty(),
        "consumer dlq sees the purge too"
    );
    browser.close().await;
}

pub async fn a_job_body_with_markup_is_shown_as_text_and_runs_nothing(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("console-xss");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = console_producer(backend, &queue).await;
    let consumer = failing_consumer(backend, &queue).await;
    let id = post_as(&producer, ADMIN, &queue, XSS).await;
    wait_dead(&consumer, &[&id]).await;

    let browser = Browser::start().await;
    sign_in(&browser, &producer, ADMIN).await;
    until_dead_row(&browser, &id).await;
    let row = dead_row(&id);
    let body = browser
        .text(&format!(r#"{row} td[data-field="body"]"#))
        .await
        .unwrap_or_default();
    assert!(
        body.contains("<img src=x onerror="),
        "the body as text: {body}"
    );
    // The reason carries the body too (the command echoed it to stderr).
    let reason = browser
        .text(&format!(r#"{row} td[data-field="reason"]"#))
        .await
        .unwrap_or_default();
    assert!(reason.contains("<img"), "the reason as text: {reason}");
    assert_eq!(
        browser.count("#dead-table img, #dead-table script").await,
        0
    );

    // The job page shows the same error as text.
    browser
        .click(&format!(r#"{row} td[data-field="job-id"] a"#))
        .await;
    browser.until_visible("#page-job").await;
    browser
        .until_text("#job-state", "dead", |t| t == "dead")
        .await;
    let error = browser.text("#job-error").await.unwrap_or_default();
    assert!(error.contains("<script>"), "the error as text: {error}");

    // Nothing ran: no element was made of the markup, and the title is the page's own.
    assert_eq!(browser.count("img").await, 0);
    assert_eq!(browser.count("script").await, 1, "only app.js");
    assert_ne!(browser.title().await, "pwned");
    assert_eq!(browser.title().await, "jobgate console");
    browser.close().await;
}

pub async fn the_console_is_served_with_a_content_security_policy(backend: Backend) {
    let _brokers = brokers_shared().await;
    let queue = unique("console-csp");
    let _cleanup = backend.cleanup(&[&queue]);
    let producer = console_producer(backend, &queue).await;
    for (path, kind) in [
        ("/ui", "text/html"),
        ("/ui/", "text/html"),
        ("/ui/app.js", "javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        // No key: the console's files hold no data.
        let response = producer
            .http
            .get(producer.url(path))
            .send()
            .await
            .expect("GET a console file");
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers();
        assert_eq!(
            headers
                .get("content-security-policy")
                .and_then(|v| v.to_str().ok()),
            Some(CSP),
            "{path}"
        );
        let content_type = headers["content-type"].to_str().unwrap_or_default();
        assert!(content_type.contains(kind), "{path}: {content_type}");
        let text = response.text().await.expect("the file");
        if kind == "text/html" {
            // Nothing the policy would block: no inline script, handler or style.
            let lower = text.to_ascii_lowercase();
            for (at, _) in lower.match_indices("<script") {
                assert!(
                    lower[at..].starts_with(r#"<script src="/ui/app.js""#),
                    "{path}: an inline script"
                );
            }
            assert!(!lower.contains("<style"), "{path}: an inline style");
            assert!(!lower.contains(" style="), "{path}: a style attribute");
            let handler = lower
                .split(|c: char| c.is_whitespace())
                .any(|word| word.starts_with("on") && word.contains('='));
            assert!(!handler, "{path}: an on* attribute");
        }
    }
    // The API itself still needs a key.
    let me = producer
        .http
        .get(producer.url("/me"))
        .send()
        .await
        .expect("GET /me");
    assert_eq!(me.status(), 401);
}
