#!/usr/bin/env bash
# Runs one troupe job on a list of hosts over ssh: the coordinator on the first host (or
# --coordinator), workers on every host. Copies the binary and the run configuration to each
# host, starts everything, gathers every process's output into one local folder, and stops
# everything everywhere on Ctrl-C. The exit code is the coordinator's (130 after Ctrl-C).
#
#   scripts/launch-ssh.sh --hosts node1,node2,node3 --config run.toml
#
# Every host must see the prepared data (data.dir) and the run folder (run.out_dir) at the same
# path (a shared filesystem, or --copy for the data), and libtorch where the binary expects it:
# the path it was built against (scripts/setup.sh on each host, or the same cache folder
# shared), or --libtorch DIR. Run with --help for every option.
set -euo pipefail
if [ "${BASH_VERSINFO[0]}" -lt 5 ] || { [ "${BASH_VERSINFO[0]}" -eq 5 ] && [ "${BASH_VERSINFO[1]}" -lt 1 ]; }; then
    echo "launch-ssh: needs bash 5.1 or newer (this is $BASH_VERSION)" >&2
    exit 2
fi

usage() {
    cat <<'EOF'
Usage: scripts/launch-ssh.sh --hosts H1,H2,... [options] [-- extra coordinator arguments]

Hosts are ssh destinations ([user@]host); the coordinator runs on the first one and workers on
every one (--workers-per-host each).

Options:
  --hosts LIST              comma-separated ssh destinations (required)
  --config FILE             run configuration (TOML); default: the embedded default
  --coordinator HOST        where the coordinator runs (default: the first host)
  --workers-per-host N      worker processes per host (default 1; e.g. one per GPU)
  --port PORT               the coordinator's QUIC port (default 7070)
  --binary FILE             the troupe binary to copy (default: target/release/troupe)
  --remote-dir DIR          where the binary, config and pid files go on each host, made
                            private (mode 700) and refused unless yours; relative to the
                            remote home (default: .cache/troupe-launch/<date-time>-<pid>,
                            one per launch)
  --libtorch DIR            libtorch's folder on the hosts (its lib/ goes on LD_LIBRARY_PATH);
                            default: the path the binary was built against
  --copy PATH               also copy this file or folder to the same absolute path on every
                            host (repeatable; e.g. the prepared data folder)
  --logs DIR                local folder for every process's output
                            (default: launch-logs/<date-time>)
  --worker-args "ARGS"      extra arguments for every worker (e.g. "--threads 8")
  --ssh-opt OPT             an option for every ssh call (repeatable; e.g. --ssh-opt -p
                            --ssh-opt 2222, or --ssh-opt -i --ssh-opt ~/.ssh/cluster)
  --grace SECONDS           after Ctrl-C or the coordinator's end, how long processes get to
                            stop before they are killed (default 60)
  --dry-run                 print the commands that would run, run nothing
  -h, --help                this text

The join token is fresh for every launch and reaches each process on its standard input, never
on a command line. The coordinator listens on 0.0.0.0:PORT; workers join COORDINATOR:PORT.

Examples:
  scripts/launch-ssh.sh --hosts node1,node2 --config run.toml --copy /data/corpus
  scripts/launch-ssh.sh --hosts gpu1,gpu2 --workers-per-host 8 --config run.toml -- --resume
EOF
}

hosts_csv=""
config=""
coordinator_host=""
workers_per_host=1
port=7070
binary=""
remote_dir=""
libtorch=""
copies=()
logs=""
worker_args=""
ssh_opts=(-o BatchMode=yes -o ServerAliveInterval=15 -o ServerAliveCountMax=4)
grace=60
dry_run=0
coordinator_args=()

die() { echo "launch-ssh: $*" >&2; exit 2; }
need() { if [ "$#" -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value (see --help)"; fi; }

while [ "$#" -gt 0 ]; do
    case "$1" in
        --hosts) need "$@"; hosts_csv=$2; shift 2 ;;
        --config) need "$@"; config=$2; shift 2 ;;
        --coordinator) need "$@"; coordinator_host=$2; shift 2 ;;
        --workers-per-host) need "$@"; workers_per_host=$2; shift 2 ;;
        --port) need "$@"; port=$2; shift 2 ;;
        --binary) need "$@"; binary=$2; shift 2 ;;
        --remote-dir) need "$@"; remote_dir=$2; shift 2 ;;
        --libtorch) need "$@"; libtorch=$2; shift 2 ;;
        --copy) need "$@"; copies+=("$2"); shift 2 ;;
        --logs) need "$@"; logs=$2; shift 2 ;;
        --worker-args) need "$@"; worker_args=$2; shift 2 ;;
        --ssh-opt) need "$@"; ssh_opts+=("$2"); shift 2 ;;
        --grace) need "$@"; grace=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; coordinator_args=("$@"); break ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[ -n "$hosts_csv" ] || die "--hosts is required (see --help)"
IFS=, read -r -a hosts <<<"$hosts_csv"
[ "${#hosts[@]}" -gt 0 ] || die "--hosts lists no host"
[[ "$workers_per_host" =~ ^[1-9][0-9]*$ ]] || die "--workers-per-host must be a positive number, not $workers_per_host"
if ! [[ "$port" =~ ^[0-9]+$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then die "--port must be 1-65535, not $port"; fi
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace must be a number of seconds, not $grace"
[ -n "$coordinator_host" ] || coordinator_host=${hosts[0]}
root=$(cd "$(dirname "$0")/.." && pwd)
[ -n "$binary" ] || binary=$root/target/release/troupe
[ -x "$binary" ] || die "no troupe binary at $binary (build it: scripts/setup.sh && cargo build --release, or pass --binary)"
[ -z "$config" ] || [ -f "$config" ] || die "no config file $config"
for path in "${copies[@]+"${copies[@]}"}"; do
    [ -e "$path" ] || die "--copy $path: no such file or folder"
    case "$path" in /*) ;; *) die "--copy $path: give an absolute path (it is copied to the same path on every host)" ;; esac
done
launch_id=$(date +%Y%m%d-%H%M%S)-$$
[ -n "$logs" ] || logs=launch-logs/$launch_id
[ -n "$remote_dir" ] || remote_dir=.cache/troupe-launch/$launch_id
total_workers=$(( ${#hosts[@]} * workers_per_host ))
join_host=${coordinator_host#*@}

# The distinct hosts (a host may be listed once for the coordinator and once for workers).
distinct_hosts=()
for h in "$coordinator_host" "${hosts[@]}"; do
    case " ${distinct_hosts[*]-} " in *" $h "*) ;; *) distinct_hosts+=("$h") ;; esac
done

rdir=$(printf %q "$remote_dir")   # quoted for the remote shell
remote_env="cd $rdir &&"
if [ -n "$libtorch" ]; then
    remote_env="$remote_env export LD_LIBRARY_PATH=$(printf %q "$libtorch/lib")\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} &&"
fi
config_args=()
[ -z "$config" ] || config_args=(--config config.toml)
# The remote command of one process (for a POSIX login shell: sh, bash, zsh): reads the token
# from stdin, records its pid (Ctrl-C stops it through that), then becomes troupe. Arguments
# are quoted one by one; --worker-args is split into words on purpose.
remote_command() { # name, troupe arguments...
    local name=$1 quoted="" arg; shift
    for arg in "$@"; do quoted+=" $(printf %q "$arg")"; done
    printf '%s read -r TROUPE_TOKEN && export TROUPE_TOKEN && echo $$ > %q && exec ./troupe%s' \
        "$remote_env" "$name.pid" "$quoted"
}
coordinator_cmd=$(remote_command coordinator coordinator "${config_args[@]+"${config_args[@]}"}" --listen "0.0.0.0:$port" --workers "$total_workers" "${coordinator_args[@]+"${coordinator_args[@]}"}")
read -r -a worker_words <<<"$worker_args"
worker_cmd() { # name
    remote_command "$1" worker --join "$join_host:$port" "${worker_words[@]+"${worker_words[@]}"}"
}

if [ "$dry_run" = 1 ]; then
    for h in "${distinct_hosts[@]}"; do
        echo "ssh ${ssh_opts[*]} $h mkdir -p $remote_dir  # then copy $binary -> $remote_dir/troupe${config:+, $config -> $remote_dir/config.toml}"
        for path in "${copies[@]+"${copies[@]}"}"; do
            echo "tar -C $(dirname "$path") -cf - $(basename "$path") | ssh ${ssh_opts[*]} $h tar -C $(dirname "$path") -xf -"
        done
    done
    echo "ssh ${ssh_opts[*]} $coordinator_host $coordinator_cmd  > $logs/coordinator.log"
    for h in "${hosts[@]}"; do
        for ((i = 0; i < workers_per_host; i++)); do
            name=worker-${h#*@}-$i
            echo "ssh ${ssh_opts[*]} $h $(worker_cmd "$name")  > $logs/$name.log"
        done
    done
    exit 0
fi

mkdir -p "$logs"
token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
say() { echo "launch-ssh: $*" >&2; }

# Copy the binary and config (atomically: a host that runs an older binary keeps it until the
# new one is complete), the --copy paths, and check that the binary runs there.
for h in "${distinct_hosts[@]}"; do
    say "preparing $h:$remote_dir"
    # The folder is private and must be ours (a folder someone else made could hold links):
    # umask 077 for everything written in it, including the config with its secrets.
    # shellcheck disable=SC2029  # expanded here on purpose: the paths are ours
    ssh "${ssh_opts[@]}" "$h" "umask 077 && mkdir -p $rdir && [ -O $rdir ] && chmod 700 $rdir && cd $rdir && cat > troupe.partial && chmod +x troupe.partial && mv -f troupe.partial troupe" <"$binary" \
        || die "cannot copy the binary to $h:$remote_dir (is that folder yours?)"
    if [ -n "$config" ]; then
        # shellcheck disable=SC2029
        ssh "${ssh_opts[@]}" "$h" "umask 077 && cat > $rdir/config.toml" <"$config" || die "cannot copy the config to $h"
    fi
    for path in "${copies[@]+"${copies[@]}"}"; do
        parent=$(dirname "$path")
        # shellcheck disable=SC2029
        tar -C "$parent" -cf - "$(basename "$path")" | ssh "${ssh_opts[@]}" "$h" "mkdir -p $(printf %q "$parent") && tar -C $(printf %q "$parent") -xf -" \
            || die "cannot copy $path to $h"
    done
    # shellcheck disable=SC2029
    if ! version=$(ssh "${ssh_opts[@]}" "$h" "$remote_env ./troupe --version" 2>&1); then
        die "the binary does not run on $h: $version (is libtorch at the path it was built against? see --libtorch)"
    fi
done

pids=()     # local ssh processes (the coordinator's first)
coordinator_pid=""
names=()    # host:name of each, for stopping it remotely
start() { # host, name, log, remote command
    local h=$1 name=$2 log=$3 cmd=$4
    # shellcheck disable=SC2029
    ssh "${ssh_opts[@]}" "$h" "$cmd" <<<"$token" >"$log" 2>&1 &
    pids+=("$!")
    names+=("$h $name")
}

# Signals processes through their pid files, only while a pid still runs this launch's binary
# (a pid of a process that has ended may have been reused), and only those still running
# here (their ssh has not ended).
stopping=0
signal_processes() { # signal, index...
    local signal=$1 i h name killers=(); shift
    for i in "$@"; do
        kill -0 "${pids[$i]}" 2>/dev/null || continue
        h=${names[$i]% *}; name=${names[$i]##* }
        # shellcheck disable=SC2029
        ssh "${ssh_opts[@]}" "$h" "cd $rdir && p=\$(cat $name.pid 2>/dev/null) && [ \"\$(readlink /proc/\$p/exe)\" = \"\$(pwd -P)/troupe\" ] && kill -$signal \$p; true" </dev/null >/dev/null 2>&1 &
        killers+=("$!")
    done
    if [ "${#killers[@]}" -gt 0 ]; then wait "${killers[@]}" 2>/dev/null || true; fi
}
stop_all() { # signal
    signal_processes "$1" "${!pids[@]}"
}
running() {
    local pid
    for pid in "${pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then return 0; fi
    done
    return 1
}
wait_until_stopped() { # seconds
    local deadline=$((SECONDS + $1))
    while running && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
    ! running
}
shutdown() {
    [ "$stopping" = 0 ] || return 0
    stopping=1
    say "stopping every process (grace ${grace}s)…"
    # The coordinator first: it finishes the step, checkpoints and dismisses the workers.
    local deadline=$((SECONDS + grace))
    signal_processes TERM 0
    while kill -0 "$coordinator_pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
    stop_all TERM
    if ! wait_until_stopped $((deadline > SECONDS ? deadline - SECONDS : 1)); then
        say "some processes did not stop within ${grace}s: killing them"
        stop_all KILL
        wait_until_stopped 10 || true
    fi
}
interrupted=0
# Ctrl-C, a kill, or the terminal going away (the remote processes would run on unwatched).
trap 'interrupted=1; shutdown' INT TERM HUP

say "coordinator on $coordinator_host:$port, $total_workers workers on ${#hosts[@]} hosts; logs in $logs/"
start "$coordinator_host" coordinator "$logs/coordinator.log" "$coordinator_cmd"
coordinator_pid=${pids[0]}
for h in "${hosts[@]}"; do
    for ((i = 0; i < workers_per_host; i++)); do
        [ "$stopping" = 0 ] || break 2  # interrupted while starting: start no more
        name=worker-${h#*@}-$i
        start "$h" "$name" "$logs/$name.log" "$(worker_cmd "$name")"
    done
done

# The coordinator's end is the run's end. A worker that ends before it is reported (the
# coordinator carries on without it, or waits for it as cluster.min_workers says). `wait -n`
# returns early when a signal arrives; the trap has then begun the shutdown, and we go on
# waiting for the coordinator.
status=""
waiting=("${pids[@]}")
while [ -z "$status" ]; do
    finished=""
    if wait -n -p finished "${waiting[@]}"; then code=0; else code=$?; fi
    [ -n "${finished:-}" ] || continue  # a signal (the trap ran), not a process, ended the wait
    still=()
    for pid in "${waiting[@]}"; do
        [ "$pid" = "$finished" ] || still+=("$pid")
    done
    waiting=("${still[@]}")
    if [ "$finished" = "$coordinator_pid" ]; then
        status=$code
    elif [ "$stopping" = 0 ]; then
        for i in "${!pids[@]}"; do
            if [ "${pids[$i]}" = "$finished" ]; then
                say "${names[$i]/ /: } exited with status $code before the coordinator (see its log)"
            fi
        done
    fi
done
[ "$interrupted" = 1 ] || say "the coordinator exited with status $status"
# Workers leave by themselves when the coordinator ends; anything left is stopped.
if ! wait_until_stopped "$grace"; then
    shutdown
fi
wait || true
if [ "$interrupted" = 1 ]; then
    say "stopped after Ctrl-C; logs in $logs/"
    exit 130
fi
say "logs in $logs/"
exit "$status"
