# Shared code of qmpbackup's fsfreeze hooks; sourced, never run (installed
# without the executable bit, so qemu-ga's fsfreeze-hook runner skips it).
#
# qemu-ga runs /etc/qemu/fsfreeze-hook with "freeze" before it freezes the
# guest filesystems and with "thaw" after it thawed them; that runner calls
# every executable in /etc/qemu/fsfreeze-hook.d/ in turn and waits for each.
# The whole freeze, hooks included, must finish within qmpbackup's freeze
# timeout (30 s) or the backup goes on unquiesced, so every wait here is
# bounded by one deadline per hook (HOOK_FREEZE_TIMEOUT).
#
# A lock that has to last until the thaw is held by a database client
# running in the background: it reads its statements from a FIFO that a
# "feeder" process writes — the lock statements at once, the release
# statements when the thaw removes the hold file (or after HOOK_HOLD_MAX
# seconds, should no thaw ever come).  Both are started through a
# short-lived subshell so that init, not the hook, is their parent: a
# client that dies is not left waiting for the hook to reap it.
#
# POSIX sh; runs under busybox ash and dash.

HOOK_CONF=${QMPBACKUP_FSFREEZE_CONF:-/etc/qemu/qmpbackup-fsfreeze.conf}
# Defaults; the configuration file may change any of them.
HOOK_LOG=/var/log/qga-fsfreeze-hook.log
# Not on a filesystem that gets frozen: /run is a tmpfs.
HOOK_STATE=/run/qmpbackup-fsfreeze
# Seconds each hook may wait for its database at freeze; stopping a client
# that did not make it takes up to 3 s more.  The hooks run one after the
# other, and the filesystem freeze itself comes after them: keep the sum of
# (timeout + 3 s) over the installed hooks well below qmpbackup's 30 s.
HOOK_FREEZE_TIMEOUT=6
# Seconds a lock is held at most when no thaw comes.
HOOK_HOLD_MAX=300
# Seconds the thaw waits for a client to end after its release statements.
HOOK_RELEASE_TIMEOUT=5
if [ -r "$HOOK_CONF" ]; then
    # shellcheck disable=SC1090
    . "$HOOK_CONF"
fi

hook_log() {
    printf '%s %s[%s]: %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$HOOK_NAME" "$$" "$*" \
        >>"$HOOK_LOG" 2>/dev/null || true
}

hook_now() { date +%s; }

# A fifth of a second where sleep takes fractions (busybox, coreutils).
hook_nap() { sleep 0.2 2>/dev/null || sleep 1; }

# Start this hook's freeze clock.
hook_begin() {
    HOOK_STARTED=$(hook_now)
    HOOK_DEADLINE=$((HOOK_STARTED + HOOK_FREEZE_TIMEOUT))
    # 711: a client running as another user (psql as postgres) may reach
    # its own sub-directory, nobody may list them.
    mkdir -p "$HOOK_STATE" && chmod 711 "$HOOK_STATE"
}

# Whole seconds left before the deadline (0 when it has passed).
hook_remaining() {
    left=$((HOOK_DEADLINE - $(hook_now)))
    [ "$left" -gt 0 ] || left=0
    echo "$left"
}

hook_elapsed() { echo "$(($(hook_now) - HOOK_STARTED)) s"; }

# hook_alive PID: the process exists and is not a zombie (an orphan waits
# as one until init reaps it, and some inits are slow to).
hook_alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [ "$(sed -n 's/.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# hook_kill PID: TERM, then KILL if it is still there a second later.
hook_kill() {
    hook_alive "$1" || return 0
    kill -TERM "$1" 2>/dev/null || return 0
    for _ in 1 2 3 4 5; do
        hook_alive "$1" || return 0
        hook_nap
    done
    kill -KILL "$1" 2>/dev/null || true
}

# hook_run_bounded SECONDS CMD [ARG...]: run CMD, stopped when SECONDS pass;
# its status, or 124 when it had to be stopped.
hook_run_bounded() {
    limit=$1
    shift
    flag="$HOOK_STATE/.timeout.$$"
    rm -f "$flag"
    "$@" </dev/null &
    pid=$!
    (
        end=$(($(hook_now) + limit))
        while hook_alive "$pid"; do
            if [ "$(hook_now)" -ge "$end" ]; then
                : >"$flag"
                hook_kill "$pid"
                exit 0
            fi
            hook_nap
        done
    ) </dev/null >/dev/null 2>&1 &
    watchdog=$!
    wait "$pid"
    status=$?
    wait "$watchdog"
    if [ -e "$flag" ]; then
        rm -f "$flag"
        return 124
    fi
    return "$status"
}

# hook_hold_start ID CLIENT [ARG...]: start CLIENT on $HOOK_STATE/ID/in.
# $HOOK_STATE/ID/start.sql and stop.sql must be written first (see
# hook_hold_dir).  CLIENT's output goes to $HOOK_STATE/ID/out.
hook_hold_start() {
    dir="$HOOK_STATE/$1"
    shift
    mkfifo "$dir/in" || return 1
    : >"$dir/hold"
    : >"$dir/out"
    # Redirected by exec in their own subshell: a redirection on a function
    # call makes dash keep copies of the hook's descriptors, which the
    # background process would then hold open.
    ( (exec <"$dir/in" >"$dir/out" 2>&1; "$@") & echo $! >"$dir/client.pid" )
    ( (exec </dev/null >"$dir/in" 2>/dev/null; hook_feed "$dir") & echo $! >"$dir/feeder.pid" )
}

hook_feed() {
    cat "$1/start.sql"
    end=$(($(hook_now) + HOOK_HOLD_MAX))
    while [ -e "$1/hold" ] && [ "$(hook_now)" -lt "$end" ]; do
        hook_nap
    done
    cat "$1/stop.sql"
}

# hook_hold_dir ID: a fresh, empty state directory for ID (any earlier hold
# of ID is released first: a freeze without a thaw, or a second freeze).
hook_hold_dir() {
    if [ -d "$HOOK_STATE/$1" ]; then
        hook_log "$1: releasing a lock left from an earlier freeze"
        hook_release "$1"
    fi
    mkdir "$HOOK_STATE/$1"
}

# hook_hold_wait ID MARKER_FILE_OR_LINE: 0 once the client reported the lock
# (MARKER as a line of its output, or the file $HOOK_STATE/ID/held), 1 when
# the client ended without it, 2 at the deadline.
hook_hold_wait() {
    dir="$HOOK_STATE/$1"
    pid=$(cat "$dir/client.pid" 2>/dev/null)
    while :; do
        if [ -e "$dir/held" ] || grep -qxF "$2" "$dir/out" 2>/dev/null; then
            return 0
        fi
        if [ -z "$pid" ] || ! hook_alive "$pid"; then
            # It may have written the marker just before it ended.
            [ -e "$dir/held" ] || grep -qxF "$2" "$dir/out" 2>/dev/null && return 0
            return 1
        fi
        [ "$(hook_remaining)" -gt 0 ] || return 2
        hook_nap
    done
}

# What the client printed, on one line, for the log.
hook_hold_output() {
    tr '\n' ' ' <"$HOOK_STATE/$1/out" 2>/dev/null | sed 's/ *$//' | cut -c1-500
}

# hook_release ID: let the client send its release statements and end;
# stop it if it does not.  Doing it twice, or for an ID never held, is fine.
hook_release() {
    dir="$HOOK_STATE/$1"
    [ -d "$dir" ] || return 0
    rm -f "$dir/hold"
    client=$(cat "$dir/client.pid" 2>/dev/null)
    feeder=$(cat "$dir/feeder.pid" 2>/dev/null)
    if [ -n "$client" ]; then
        end=$(($(hook_now) + HOOK_RELEASE_TIMEOUT))
        while hook_alive "$client" && [ "$(hook_now)" -lt "$end" ]; do
            hook_nap
        done
        if hook_alive "$client"; then
            hook_log "$1: client still running ${HOOK_RELEASE_TIMEOUT} s after the release: stopping it"
            hook_kill "$client"
        fi
    fi
    [ -n "$feeder" ] && hook_kill "$feeder"
    rm -rf "$dir"
}

# hook_abort ID: stop a client that did not get its lock, without waiting
# for it to release anything.
hook_abort() {
    dir="$HOOK_STATE/$1"
    [ -d "$dir" ] || return 0
    for pidfile in "$dir/client.pid" "$dir/feeder.pid"; do
        [ -r "$pidfile" ] && hook_kill "$(cat "$pidfile")"
    done
    rm -rf "$dir"
}

# hook_release_all PREFIX: release every hold whose ID starts with PREFIX.
hook_release_all() {
    for dir in "$HOOK_STATE/$1"*; do
        [ -d "$dir" ] || continue
        id=${dir##*/}
        said=$(hook_hold_output "$id")
        hook_release "$id"
        hook_log "$id: released${said:+ (client output: $said)}"
    done
}
