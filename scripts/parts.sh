# Sourced by the GPU scripts: `part NAME SECONDS command...` runs one part of a GPU job under its own
# time limit, logs it to $LOGS/NAME.log ($LOGS defaults to $OUT) and appends one line (exit status,
# seconds) to $OUT/summary.txt, so that a slow part cannot starve the parts after it.

part() {  # part NAME SECONDS command...: run it, log it, one summary line
    local name=$1 limit=$2 t0 rc pid dog
    shift 2
    t0=$(date +%s)
    # Each part in a process group of its own (job control on), ended whole when its time is up:
    # pytest-xdist workers outlive a killed pytest and would share the GPU with the next part's
    # timings. SIGINT first, so that pytest still prints its failures (without job control a
    # background command would ignore SIGINT).
    set -m
    "$@" > "${LOGS:-$OUT}/$name.log" 2>&1 &
    pid=$!
    # The watchdog holds no output open: a pipe reading this script's output ends with it.
    ( sleep "$limit"; kill -INT -- -"$pid"; sleep 20; kill -KILL -- -"$pid" ) > /dev/null 2>&1 &
    dog=$!
    wait "$pid"
    rc=$?
    kill -- -"$dog" 2>/dev/null  # its whole group, the sleep included
    wait "$dog" 2>/dev/null
    kill -KILL -- -"$pid" 2>/dev/null  # anything of the group still running
    local secs=$(( $(date +%s) - t0 ))
    echo "$name: rc=$rc$([ "$secs" -ge "$limit" ] && echo ' (time limit)') in $secs s" |
        tee -a "$OUT/summary.txt"
}
