# Step runner for bench/gpu_check.sh, sourced (bash): time-limited steps whose every output file is packed
# into one archive as each step ends, and again on exit or interruption.
#
# A device machine returns only a few files from $OUT, so a check's results must travel as one archive
# beside its plain-text summary: $OUT/<name>.tar.gz and $OUT/<name>.txt.  The archive is rewritten after
# every step (through a temporary name, then renamed), so a run killed outright (SIGKILL, no trap runs)
# still leaves the files of every step that had ended.
#
#   runner_init NAME STAGE DEST   files go to STAGE; the archive and summary to DEST (when DEST differs)
#   step NAME SECONDS CMD...      run CMD under a time limit, log to STAGE/NAME.log, record, pack
#   pack                          (re)write the archive and copy the summary
#
# RUNNER_STATUS ends 1 when any step failed; SUMMARY is the summary file inside STAGE.

RUNNER_STATUS=0

runner_init() {
    RUNNER_NAME="$1" RUNNER_STAGE="$2" RUNNER_DEST="$3"
    mkdir -p "$RUNNER_STAGE" "$RUNNER_DEST"
    SUMMARY="$RUNNER_STAGE/$RUNNER_NAME.txt"
    : >>"$SUMMARY"
    trap 'pack' EXIT
    trap 'runner_interrupted 2' INT
    trap 'runner_interrupted 15' TERM
    trap 'runner_interrupted 1' HUP
}

# On signal number $1: stop the running step as its time limit would (SIGINT, SIGKILL 10 s later), pack, and
# exit as a process killed by that signal reports it (128 + its number).
runner_interrupted() {
    echo "interrupted by a signal${RUNNER_STEP:+ during step $RUNNER_STEP}" >>"$SUMMARY"
    if [[ -n "${RUNNER_CHILD:-}" ]]; then
        # timeout(1) leads a process group of its own: signal the step's every process, not only timeout
        kill -INT -- "-$RUNNER_CHILD" 2>/dev/null
        local waited=0
        while kill -0 "$RUNNER_CHILD" 2>/dev/null && ((waited++ < 100)); do sleep 0.1; done
        kill -KILL -- "-$RUNNER_CHILD" 2>/dev/null
    fi
    pack
    trap - EXIT
    exit $((128 + $1))
}

pack() {
    [[ "$RUNNER_STAGE" -ef "$RUNNER_DEST" ]] && return 0
    local archive="$RUNNER_DEST/$RUNNER_NAME.tar.gz"
    tar -czf "$archive.partial" -C "$RUNNER_STAGE" . 2>/dev/null && mv -f "$archive.partial" "$archive"
    cp -f "$SUMMARY" "$RUNNER_DEST/$RUNNER_NAME.txt" 2>/dev/null
    return 0
}

step() {
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS
    # In the background with a wait, so that a signal to this script runs its trap at once (bash defers a
    # trap until a foreground child exits); --signal=INT first: pytest and the benchmarks write what they
    # have on KeyboardInterrupt.
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$RUNNER_STAGE/$name.log" 2>&1 &
    RUNNER_CHILD=$! RUNNER_STEP=$name
    wait "$RUNNER_CHILD"
    local rc=$?
    RUNNER_CHILD="" RUNNER_STEP=""
    tail -n 5 "$RUNNER_STAGE/$name.log"
    local verdict="exit $rc"
    ((rc == 124 || rc == 137)) && verdict="timed out (exit $rc)"
    echo "step $name: $verdict in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$SUMMARY"
    ((rc == 0)) || RUNNER_STATUS=1
    pack
}
