#!/usr/bin/env bash
# The service quickstart: bake the counter into an image as its command, boot
# it as a detached service VM (the counter is the VM's main command), read
# its log, and watch its in-memory count survive snapshot and restore; a
# fork continues from the same value independently, and `wait` returns the
# counter's exit status when it is told to quit.
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
get() { curl -fsS --retry 30 --retry-connrefused --retry-delay 0 "http://127.0.0.1:$1/${2:-}"; }

say machinen provision --copy counter.pl:/srv/counter.pl --cmd "'perl /srv/counter.pl 8080'" -o app.tar.gz
$m provision --copy counter.pl:/srv/counter.pl --cmd 'perl /srv/counter.pl 8080' -o "$work/app.tar.gz"
say machinen boot --name counter --detached --memory 512 -p $port:8080 app.tar.gz
$m boot --name counter --detached --memory 512 -p "$port:8080" "$work/app.tar.gz"
# The counter says on stderr when it listens: wait for that in its log.
for _ in $(seq 100); do $m logs counter 2>&1 | grep -q 'counter listening' && break; sleep 0.2; done
say curl localhost:$port; get "$port"
say curl localhost:$port; get "$port"
say "machinen logs counter   # the counter's stdout and stderr, kept per VM"
sleep 0.5
$m logs counter

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
say "curl localhost:$port   # the source counts on its own"
get "$port"
say "machinen logs counter   # its log goes on across the restore"
sleep 0.5
$m logs counter
say machinen ls
$m ls

say "curl localhost:$fork_port/quit; machinen wait counter-b   # the counter exits 0, the VM stops"
get "$fork_port" quit
$m wait counter-b && echo "counter-b exited with status $?"
