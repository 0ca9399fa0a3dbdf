# shellcheck shell=bash
# The test PKI behind the brokers' TLS listeners; sourced by scripts/brokers.sh, which
# sets STATE_ROOT, PROG, log and die.
#
# In $TLS_DIR (state/tls):
#   ca.pem / ca.key           a self-signed CA, "jobgate test CA"
#   server.pem / server.key   signed by it, for IP 127.0.0.1 and DNS localhost
#   server-keystore.pem       server.key + server.pem: a Kafka PEM keystore
#   client.pem / client.key   signed by it, CN=$TLS_CLIENT_CN, for mutual TLS (Kafka's
#                             SSL listener, RabbitMQ's EXTERNAL login)
# Made with the openssl command on first use, and made again, all of them, when any is
# missing or expires within a day. Loopback tests only: the keys are not encrypted.

TLS_DIR="$STATE_ROOT/tls"
TLS_CLIENT_CN=jobgate-client
TLS_DAYS=825

tls_valid() { openssl x509 -checkend 86400 -noout -in "$1" >/dev/null 2>&1; }

tls_complete() {
  local f
  for f in ca.pem server.pem client.pem; do
    tls_valid "$TLS_DIR/$f" || return 1
  done
  for f in server.key client.key server-keystore.pem; do
    [[ -s $TLS_DIR/$f ]] || return 1
  done
}

# tls_sign NAME CN EXTENSIONS: NAME.key and NAME.pem, signed by the CA in the current
# folder.
tls_sign() {
  local name=$1 cn=$2 ext=$3
  openssl req -new -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" \
    -subj "/CN=$cn" 2>/dev/null || return 1
  printf '%b' "$ext" >"$name.ext" || return 1
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
    -days "$TLS_DAYS" -sha256 -extfile "$name.ext" -out "$name.pem" 2>/dev/null || return 1
  rm -f "$name.csr" "$name.ext"
}

# tls_make_in DIR: the CA and both certificates, in DIR (each step checked: `set -e`
# does not hold in a function whose status is tested).
tls_make_in() {
  cd "$1" || return 1
  umask 077
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days "$TLS_DAYS" \
    -sha256 -subj "/CN=jobgate test CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null || return 1
  tls_sign server localhost \
    'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n' ||
    return 1
  tls_sign client "$TLS_CLIENT_CN" \
    'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' ||
    return 1
  # Kafka's PEM keystore: the PKCS#8 key, then the certificate chain.
  cat server.key server.pem >server-keystore.pem || return 1
  chmod 0644 ca.pem server.pem client.pem
}

tls_make() {
  local tmp="$TLS_DIR.new.$$"
  command -v openssl >/dev/null 2>&1 ||
    die "tls: the openssl command is needed to make the test certificates (apt-get install openssl)"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  ( tls_make_in "$tmp" ) || { rm -rf "$tmp"; die "tls: making the test certificates failed"; }
  rm -rf "$TLS_DIR.old"
  [[ -d $TLS_DIR ]] && mv "$TLS_DIR" "$TLS_DIR.old"
  mv "$tmp" "$TLS_DIR"
  rm -rf "$TLS_DIR.old"
  log "tls: made a test CA and server/client certificates in $TLS_DIR"
}

# tls_ensure: the certificates exist and are valid for at least a day more.
tls_ensure() {
  tls_complete || tls_make
}
