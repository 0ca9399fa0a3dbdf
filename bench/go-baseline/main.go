// The Go baseline of issue 15: the plainest HTTP-to-RabbitMQ ingress a Go developer
// would write (net/http and amqp091-go, publisher confirms on four channels), which the
// bench measures beside jobgate's producer in the same run. POST /jobs answers 202
// "Request received" once the broker confirmed the body, 503 otherwise.
//
//	LISTEN=127.0.0.1:8090 AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f QUEUE=q go-baseline
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

func env(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func main() {
	listen := env("LISTEN", "127.0.0.1:8090")
	url := env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
	queue := env("QUEUE", "jobs")
	channels, err := strconv.Atoi(env("CHANNELS", "4"))
	if err != nil || channels < 1 {
		log.Fatalf("CHANNELS: want a positive number, got %q", env("CHANNELS", "4"))
	}

	conn, err := amqp.Dial(url)
	if err != nil {
		log.Fatalf("connecting to RabbitMQ: %v", err)
	}
	pool := make([]*amqp.Channel, channels)
	for i := range pool {
		ch, err := conn.Channel()
		if err != nil {
			log.Fatalf("opening a channel: %v", err)
		}
		if err := ch.Confirm(false); err != nil {
			log.Fatalf("confirm mode: %v", err)
		}
		pool[i] = ch
	}
	// The broker closing the connection ends the process: the bench sees it exit. (Our
	// own Close at the end closes the channel without an error.)
	closed := conn.NotifyClose(make(chan *amqp.Error, 1))
	go func() {
		if err := <-closed; err != nil {
			log.Fatalf("the RabbitMQ connection closed: %v", err)
		}
	}()

	var next atomic.Uint64
	http.HandleFunc("POST /jobs", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
		if err != nil {
			http.Error(w, "body too large or unreadable", http.StatusRequestEntityTooLarge)
			return
		}
		id := make([]byte, 16)
		_, _ = rand.Read(id)
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		ch := pool[next.Add(1)%uint64(len(pool))]
		confirm, err := ch.PublishWithDeferredConfirmWithContext(ctx, "", queue, false, false, amqp.Publishing{
			ContentType:  "application/json",
			DeliveryMode: amqp.Persistent,
			MessageId:    hex.EncodeToString(id),
			Timestamp:    time.Now(),
			Body:         body,
		})
		if err != nil {
			http.Error(w, "publish failed: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		acked, err := confirm.WaitContext(ctx)
		if err != nil || !acked {
			http.Error(w, "not confirmed by the broker", http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusAccepted)
		_, _ = io.WriteString(w, "Request received")
	})
	// Ready once listening: the connection and its channels are open by then.
	http.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok")
	})

	// SIGTERM: stop taking requests, let those in flight finish, exit 0 (the bench
	// counts any other exit after SIGTERM as a failure).
	stop, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer cancel()
	server := &http.Server{Addr: listen}
	go func() {
		<-stop.Done()
		ctx, done := context.WithTimeout(context.Background(), 10*time.Second)
		defer done()
		_ = server.Shutdown(ctx)
	}()
	log.Printf("go-baseline listening on %s, publishing to %q over %d confirm channels", listen, queue, channels)
	if err := server.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
		log.Fatal(err)
	}
	_ = conn.Close()
}
