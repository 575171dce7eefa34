#!/usr/bin/env bash
# Make a TEST certificate authority and certificates for a wanps cluster (openssl only).
#
#   deploy/make-test-ca.sh DIR [EXTRA_SERVER_NAME ...]
#
# Writes into DIR (created if missing; existing files are overwritten):
#   ca.pem / ca.key          the test CA (clients trust ca.pem; the server trusts it for mTLS)
#   server.pem / server.key  one server certificate for the parameter server AND the controller,
#                            valid for localhost, 127.0.0.1, ::1, the compose service names
#                            `server` and `controller`, and every EXTRA_SERVER_NAME (a DNS
#                            name, or an IP address)
#   client.pem / client.key  a client certificate (CN wanps-client) for mutual TLS
#
# For tests and trying TLS out. In production use your own CA and keep ca.key off the cluster.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 DIR [EXTRA_SERVER_NAME ...]" >&2
    exit 2
fi
dir=$1
shift
days=${WANPS_TEST_CA_DAYS:-825}
mkdir -p "$dir"
cd "$dir"
umask 077  # private keys readable by their owner only

san="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:server,DNS:controller"
for name in "$@"; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then
        san+=",IP:$name"
    else
        san+=",DNS:$name"
    fi
done

# The CA: EC P-256 keys are small and fast to make (a test must not wait on RSA key generation).
openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -keyout ca.key -out ca.pem \
    -days "$days" -subj "/CN=wanps test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

issue() {  # issue NAME CN EXTENSIONS...
    local name=$1 cn=$2 ext=$3
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -keyout "$name.key" -out "$name.csr" \
        -subj "/CN=$cn" 2>/dev/null
    printf '%b' "$ext" > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$name.pem" \
        -days "$days" -extfile "$name.ext" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
}

issue server "wanps server" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=$san\n"
issue client "wanps-client" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
rm -f ca.srl
chmod 644 ca.pem server.pem client.pem
echo "test CA and certificates in $(pwd): ca.pem server.pem server.key client.pem client.key"
