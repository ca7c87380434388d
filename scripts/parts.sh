# Sourced by the GPU scripts: `part NAME SECONDS command...` runs one part of a GPU job under its own
# time limit, logs it to $LOGS/NAME.log ($LOGS defaults to $OUT) and appends one line (exit status,
# seconds) to $OUT/summary.txt, so that a slow part cannot starve the parts after it.

part() {  # part NAME SECONDS command...: run it, log it, one summary line
    local name=$1 limit=$2 t0 rc pid dog note=""
    local cut="${TMPDIR:-/tmp}/part.$$.$name.cut"  # exists once the watchdog has fired
    shift 2
    rm -f "$cut"
    t0=$(date +%s)
    # Each part in a process group of its own (job control on), ended whole when its time is up:
    # pytest-xdist workers outlive a killed pytest and would share the GPU with the next part's
    # timings. SIGINT first, so that pytest still prints its failures; the part starts with SIGINT
    # at its default, which a script started in the background would otherwise pass on ignored.
    set -m
    python3 -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])' "$@" > "${LOGS:-$OUT}/$name.log" 2>&1 &
    pid=$!
    # The watchdog holds no output open: a pipe reading this script's output ends with it.
    ( sleep "$limit"; touch "$cut"; kill -INT -- -"$pid"; sleep 20; kill -KILL -- -"$pid" ) \
        > /dev/null 2>&1 &
    dog=$!
    set +m  # the groups are made; without job control bash prints no job notices
    # Groups of their own do not get the signals that stop this script: pass them on.
    trap 'kill -INT -- -"$pid" 2>/dev/null; kill -- -"$dog" 2>/dev/null; exit 130' INT TERM
    wait "$pid"
    rc=$?
    trap - INT TERM
    kill -- -"$dog" 2>/dev/null  # its whole group, the sleep included
    wait "$dog" 2>/dev/null
    kill -KILL -- -"$pid" 2>/dev/null  # anything of the group still running
    [ -e "$cut" ] && note=" (time limit)"
    rm -f "$cut"
    echo "$name: rc=$rc$note in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
}
