# Python packages carried to a machine that cannot download them, sourced (bash) by bench/gpu_check.sh.
#
# A device machine has no network, and its image may lack a package the check needs (bitsandbytes, for QLoRA's
# tests and steps).  bench/gpu_wheels.sh downloads their wheels into .whl/ at the checkout's root on a machine
# that has a network; the folder travels with the checkout (name it in what the device call carries), and
#
#   use_carried_wheels REPO PY   installs every REPO/.whl/*.whl into a folder of their own (no index, no
#                                dependencies: what they need must be on the machine or carried too) and appends
#                                that folder to PYTHONPATH; CARRIED_WHEELS says what it did (empty with no .whl/).
#                                The folder is named after the wheels' contents (a checksum), under $TMPDIR: a
#                                later call on the same machine (the preflight, then the full check) reuses it
#                                instead of installing again, and a wheel rebuilt under the same name is installed.

use_carried_wheels() {
    local repo="$1" py="$2" names site
    CARRIED_WHEELS=""
    compgen -G "$repo/.whl/*.whl" >/dev/null || return 0
    names="$(cd "$repo/.whl" && echo *.whl)"
    site="${TMPDIR:-/tmp}/fastlora-wheels-$(cat "$repo"/.whl/*.whl | cksum | cut -d' ' -f1)"
    if [[ -e "$site/.installed" ]]; then
        CARRIED_WHEELS="carried wheels already installed: $names"
    elif rm -rf "$site" && "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$site" "$repo"/.whl/*.whl >"$site.log" 2>&1; then
        touch "$site/.installed"
        CARRIED_WHEELS="carried wheels installed: $names"
    else
        CARRIED_WHEELS="carried wheels: pip could not install them: $(tail -n 1 "$site.log")"
        return 0
    fi
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$site"
}
