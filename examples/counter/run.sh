#!/usr/bin/env bash
# The handoff quickstart: a counter that lives only in a VM's memory keeps
# counting across snapshot and restore, and a fork continues from the same
# value independently.
#
#   examples/counter/run.sh            (uses target/release/machinen, or MACHINEN=...)
set -euo pipefail
cd "$(dirname "$0")"
m=${MACHINEN:-../../target/release/machinen}
port=${PORT:-3000}
fork_port=${FORK_PORT:-3001}
work=$(mktemp -d)
trap '$m stop --force counter >/dev/null 2>&1 || true; $m stop --force counter-b >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
get() { curl -fsS --retry 20 --retry-connrefused --retry-delay 0 "http://127.0.0.1:$1/"; }

say machinen boot --name counter --detached --memory 512 -p $port:8080
$m boot --name counter --detached --memory 512 -p "$port:8080"
$m cp counter.pl counter:/root/counter.pl >/dev/null 2>&1
$m exec counter -- sh -c 'nohup perl /root/counter.pl 8080 >/dev/null 2>&1 &'
# Wait until the guest server listens (8080 is 0x1F90 in /proc/net/tcp).
$m exec counter -- sh -c 'until grep -q ":1F90 00000000:0000 0A" /proc/net/tcp; do sleep 0.1; done'
say curl localhost:$port; get "$port"
say curl localhost:$port; get "$port"

say machinen snapshot counter "$work/counter.snap"
$m snapshot counter "$work/counter.snap"
# --own-ram: the restored VM is forked below, and a fork (a snapshot) of a
# VM with its own RAM file is as quick as one of a booted VM.
say machinen restore "$work/counter.snap" --name counter -p $port:8080 --detached --own-ram
$m restore "$work/counter.snap" --name counter -p "$port:8080" --detached --own-ram
say "curl localhost:$port   # the count continues"
get "$port"

say machinen fork counter --new-name counter-b --detach -p $fork_port:8080
$m fork counter --new-name counter-b --detach -p "$fork_port:8080"
say "curl localhost:$fork_port   # the fork starts from the same value"
get "$fork_port"
say "curl localhost:$fork_port"
get "$fork_port"
say "curl localhost:$port   # the source counts on its own"
get "$port"
say machinen ls
$m ls
