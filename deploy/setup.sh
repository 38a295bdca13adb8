#!/bin/sh
# One-shot setup of the compose federation (deploy/compose.yaml). Idempotent: whatever
# exists is kept, so running it again (every `docker compose up`) changes nothing.
#
#   setup.sh init      the federation's CA and the coordinator's TLS certificate in the
#                      coordinator's state volume (certs/), a copy of the CA certificate
#                      (public, nothing else) in the CA volume the hospitals mount, and
#                      each hospital's SuperNode-authentication key pair in its keys volume
#   setup.sh register  registers each hospital's PUBLIC key with the running coordinator
#                      (run in its network namespace: registration uses its local Control
#                      API); a key that changed since is registered with --force, which
#                      revokes the old one
#
# In a real federation the hospitals make their own keys (`vesalius node keys`) and send
# only the public key; this script plays every role because compose runs them all on one
# machine for a trial. Settings (environment):
#   VESALIUS_STATE_DIR          coordinator state   (default /var/lib/vesalius/coordinator)
#   VESALIUS_CA_DIR             public CA copy      (default /var/lib/vesalius/ca)
#   VESALIUS_SITE_KEYS          one folder per site (default /var/lib/vesalius/site-keys)
#   VESALIUS_SITES              site names          (default "hospital-a hospital-b")
#   VESALIUS_COORDINATOR_HOSTS  names in the TLS certificate
#                               (default "coordinator localhost 127.0.0.1")
#   VESALIUS                    the vesalius command (default vesalius)
set -eu

STATE_DIR=${VESALIUS_STATE_DIR:-/var/lib/vesalius/coordinator}
CA_DIR=${VESALIUS_CA_DIR:-/var/lib/vesalius/ca}
KEYS_ROOT=${VESALIUS_SITE_KEYS:-/var/lib/vesalius/site-keys}
SITES=${VESALIUS_SITES:-"hospital-a hospital-b"}
HOSTS=${VESALIUS_COORDINATOR_HOSTS:-"coordinator localhost 127.0.0.1"}
VESALIUS=${VESALIUS:-vesalius}

say() { printf 'setup: %s\n' "$*"; }
fail() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# The one public key (*.pub) in a site's key folder.
public_key() {
    found=""
    for pub in "$1"/*.pub; do
        [ -f "$pub" ] || continue
        [ -z "$found" ] || fail "more than one public key in $1"
        found=$pub
    done
    printf '%s' "$found"
}

init() {
    certs="$STATE_DIR/certs"
    if [ -f "$certs/ca.crt" ] && [ -f "$certs/server.crt" ] && [ -f "$certs/server.key" ]; then
        say "certificates: kept those in $certs"
    else
        set -- federation certs --out "$certs"
        for host in $HOSTS; do
            set -- "$@" --host "$host"
        done
        "$VESALIUS" "$@"
    fi
    mkdir -p "$CA_DIR"
    if ! cmp -s "$certs/ca.crt" "$CA_DIR/ca.crt"; then
        cp "$certs/ca.crt" "$CA_DIR/ca.crt.new"
        chmod 0644 "$CA_DIR/ca.crt.new"
        mv "$CA_DIR/ca.crt.new" "$CA_DIR/ca.crt"
        say "CA certificate copied to $CA_DIR/ca.crt"
    fi
    for site in $SITES; do
        dir="$KEYS_ROOT/$site"
        if [ -n "$(public_key "$dir")" ]; then
            say "$site: kept its key pair in $dir"
        else
            "$VESALIUS" node keys --out "$dir" --site-name "$site"
        fi
    done
}

register() {
    registered="$STATE_DIR/registered"
    mkdir -p "$registered"
    for site in $SITES; do
        pub=$(public_key "$KEYS_ROOT/$site")
        [ -n "$pub" ] || fail "$site has no public key in $KEYS_ROOT/$site: run 'setup.sh init' first"
        if cmp -s "$pub" "$registered/$site.pub"; then
            say "$site: already registered"
            continue
        fi
        if [ -f "$registered/$site.pub" ]; then
            # A new key pair: register it in place of the old one, which is revoked.
            say "$site: its key changed; registering the new one (the old key is revoked)"
            "$VESALIUS" coordinator register --site "$site" --public-key "$pub" \
                --state-dir "$STATE_DIR" --force
        else
            "$VESALIUS" coordinator register --site "$site" --public-key "$pub" \
                --state-dir "$STATE_DIR"
        fi
        cp "$pub" "$registered/$site.pub.new"
        mv "$registered/$site.pub.new" "$registered/$site.pub"
    done
}

case "${1:-}" in
    init) init ;;
    register) register ;;
    *) fail "usage: setup.sh init|register" ;;
esac
