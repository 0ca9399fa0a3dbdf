module jobgate/bench/go-baseline

go 1.26

require github.com/rabbitmq/amqp091-go v1.17.0
