# Shared helpers for the scripts in this folder (sourced, not run).

# Run a command as root: directly when we are root, through passwordless sudo otherwise; fail if neither.
run_as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 1
    fi
}
