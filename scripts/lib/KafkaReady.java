// Readiness probe for a Kafka started by scripts/brokers.sh: returns 0 only when the
// broker is usable the way jobgate and its tests use it, not merely listening.
//
//   java -cp '<probe classes>:<kafka libs>/*' KafkaReady BOOTSTRAP DEADLINE_SECONDS [REPLICATION]
//
// Each step is retried until it succeeds or the deadline passes (then exit 1 with the
// step and the last error):
//   1. the cluster answers with a controller and its brokers (metadata);
//   2. a probe topic exists (created on first use) and every partition has a leader;
//   3. a record is produced to it with acks=all (the partition leader takes writes);
//   4. a consumer group commits an offset and the admin client reads it back: the group
//      coordinator (and so __consumer_offsets) is loaded. Right after a start this is the
//      step that fails with NOT_COORDINATOR or COORDINATOR_LOAD_IN_PROGRESS;
//   5. when KAFKA_READY_SCRAM_USER and KAFKA_READY_SCRAM_PASSWORD are set, that user's
//      SCRAM-SHA-256 and SCRAM-SHA-512 credentials are stored (an upsert: the same
//      password again is harmless), for the SASL_SSL listener of the TLS tests.
import java.time.Duration;
import java.util.Collections;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.DescribeClusterResult;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.ScramCredentialInfo;
import org.apache.kafka.clients.admin.ScramMechanism;
import org.apache.kafka.clients.admin.UserScramCredentialUpsertion;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public final class KafkaReady {
  static final String TOPIC = "jobgate.readiness";
  static final String GROUP = "jobgate.readiness";

  interface Step {
    String run() throws Exception;
  }

  static long deadline;

  public static void main(String[] args) throws Exception {
    if (args.length < 2) {
      System.err.println("usage: KafkaReady BOOTSTRAP DEADLINE_SECONDS [REPLICATION]");
      System.exit(2);
    }
    String bootstrap = args[0];
    deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[1]));
    short replication = args.length > 2 ? Short.parseShort(args[2]) : 1;

    Properties common = new Properties();
    common.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    common.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "5000");
    common.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "10000");
    common.put(AdminClientConfig.RECONNECT_BACKOFF_MAX_MS_CONFIG, "500");

    try (Admin admin = Admin.create(common)) {
      retry("cluster metadata (controller and brokers)", () -> {
        DescribeClusterResult cluster = admin.describeCluster();
        int brokers = cluster.nodes().get(5, TimeUnit.SECONDS).size();
        if (cluster.controller().get(5, TimeUnit.SECONDS) == null) {
          throw new IllegalStateException("no controller yet");
        }
        if (brokers < replication) {
          throw new IllegalStateException(brokers + " of " + replication + " brokers registered");
        }
        return brokers + " broker(s)";
      });
      retry("probe topic " + TOPIC + " with a leader for every partition", () -> {
        try {
          admin.createTopics(Collections.singleton(new NewTopic(TOPIC, 1, replication)))
              .all().get(10, TimeUnit.SECONDS);
        } catch (java.util.concurrent.ExecutionException e) {
          if (!(e.getCause() instanceof TopicExistsException)) {
            throw e;
          }
        }
        TopicDescription d = admin.describeTopics(Collections.singleton(TOPIC))
            .allTopicNames().get(10, TimeUnit.SECONDS).get(TOPIC);
        d.partitions().forEach(p -> {
          if (p.leader() == null || p.leader().isEmpty()) {
            throw new IllegalStateException("partition " + p.partition() + " has no leader");
          }
        });
        return d.partitions().size() + " partition(s)";
      });

      Properties pp = new Properties();
      pp.putAll(common);
      pp.remove(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG);
      pp.put(ProducerConfig.ACKS_CONFIG, "all");
      pp.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, "10000");
      pp.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, "10000");
      pp.put(ProducerConfig.LINGER_MS_CONFIG, "0");
      try (KafkaProducer<byte[], byte[]> producer =
          new KafkaProducer<>(pp, new ByteArraySerializer(), new ByteArraySerializer())) {
        retry("a record produced with acks=all", () -> {
          long offset = producer.send(new ProducerRecord<>(TOPIC, "ready".getBytes()))
              .get(10, TimeUnit.SECONDS).offset();
          return "offset " + offset;
        });
      }

      Properties cp = new Properties();
      cp.putAll(common);
      cp.put(ConsumerConfig.GROUP_ID_CONFIG, GROUP);
      cp.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
      TopicPartition tp = new TopicPartition(TOPIC, 0);
      try (KafkaConsumer<byte[], byte[]> consumer =
          new KafkaConsumer<>(cp, new ByteArrayDeserializer(), new ByteArrayDeserializer())) {
        consumer.assign(Collections.singleton(tp));
        retry("group coordinator: commit an offset and read it back", () -> {
          long want = System.currentTimeMillis() % 1000;
          consumer.commitSync(Map.of(tp, new OffsetAndMetadata(want)), Duration.ofSeconds(10));
          OffsetAndMetadata got = admin.listConsumerGroupOffsets(GROUP)
              .partitionsToOffsetAndMetadata().get(10, TimeUnit.SECONDS).get(tp);
          if (got == null || got.offset() != want) {
            throw new IllegalStateException("committed " + want + ", read back " + got);
          }
          return "group " + GROUP + " committed offset " + want;
        });
      }

      String scramUser = System.getenv("KAFKA_READY_SCRAM_USER");
      String scramPassword = System.getenv("KAFKA_READY_SCRAM_PASSWORD");
      if (scramUser != null && !scramUser.isEmpty() && scramPassword != null) {
        retry("SCRAM credentials of user " + scramUser, () -> {
          // One mechanism a request: the broker refuses two changes of one user in one.
          for (ScramMechanism m : new ScramMechanism[] {
              ScramMechanism.SCRAM_SHA_256, ScramMechanism.SCRAM_SHA_512}) {
            admin.alterUserScramCredentials(java.util.List.of(new UserScramCredentialUpsertion(
                    scramUser, new ScramCredentialInfo(m, 4096), scramPassword)))
                .all().get(10, TimeUnit.SECONDS);
          }
          return "SCRAM-SHA-256 and SCRAM-SHA-512";
        });
      }
    }
    System.exit(0);
  }

  static void retry(String what, Step step) throws InterruptedException {
    Exception last = null;
    int tries = 0;
    while (System.nanoTime() < deadline) {
      tries++;
      try {
        String detail = step.run();
        System.out.println("kafka-ready: " + what + ": ok (" + detail + (tries > 1 ? ", after " + tries + " tries" : "") + ")");
        return;
      } catch (Exception e) {
        last = e;
        Thread.sleep(250);
      }
    }
    Throwable cause = last;
    while (cause != null && cause.getCause() != null && cause != cause.getCause()) {
      cause = cause.getCause();
    }
    System.err.println("kafka-ready: " + what + ": not ready before the deadline after " + tries
        + " tries; last error: " + cause);
    System.exit(1);
  }
}
