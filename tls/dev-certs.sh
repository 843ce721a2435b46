#!/bin/sh
# Makes a development CA and certificates for a local raftkvd cluster, with openssl:
#
#   tls/dev-certs.sh DIR [HOST...]
#
# DIR/ca.pem            the CA (trust it: --trusted-ca-file, --peer-trusted-ca-file, curl --cacert)
# DIR/node.pem, -key    a certificate for the nodes, both ports (localhost, 127.0.0.1, ::1, and HOSTs)
# DIR/admin.pem, -key   a client certificate with common name "admin" (for --admin-cn admin)
# DIR/client.pem, -key  a client certificate with common name "client"
#
# For development and tests only: the CA key is left in DIR, keys are unencrypted, and
# everything is valid for 30 days. Never use these on a real network.
set -eu
dir=${1:?usage: dev-certs.sh DIR [HOST...]}
shift
mkdir -p "$dir"
cd "$dir"

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for host in "$@"; do
    case $host in
        *[!0-9.:]*) san="$san,DNS:$host" ;;
        *) san="$san,IP:$host" ;;
    esac
done

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=raftkvd development CA" -keyout ca-key.pem -out ca.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null

# issue NAME CN EXTENSIONS: a key and a certificate signed by the CA.
issue() {
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
        -keyout "$1-key.pem" -out "$1.csr" 2>/dev/null
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
        -extfile "$1.ext" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

issue node raftkvd-node "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san"
for who in admin client; do
    issue "$who" "$who" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
done
rm -f ca.srl
echo "made a development CA and certificates in $PWD"
