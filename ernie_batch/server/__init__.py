"""The local Prefect server: one per home, started by the first command that needs it, kept for the next.

Prefect's import and a server's start cost seconds (8-15 s a command before this package);
a server that outlives one command costs them once. `run`, `backfill`, `demo` and `serve`
(when no PREFECT_API_URL is configured) use the home's server if one answers, and start it
if none does. The modules, in the order a command meets them:

    home      the files in PREFECT_HOME: the state file naming the server, its locks, its log
    daemon    the server process (`python -m ernie_batch.server.daemon`): Prefect's API, UI
              and services under uvicorn, the state file, idle shutdown
    local     a command's side: find the server (health in < 100 ms), replace a stale one,
              start one and wait for it, `server stop`
    orphans   flow runs a killed command left `Running`, marked `Crashed` by the next command

Two kinds of server share the code: **background** (detached, its own session, stops after
`server.idle_shutdown_minutes` without a command or a request, or by `server stop`) and
**attached** (a command's own, as every command had before: stopped when the command ends,
asked by the kernel to stop when it dies). Whichever runs holds the home's server lock, so
there are never two servers on one database; every command using one holds the users lock
(shared), so neither kind stops under a command still using it.

Nothing here imports Prefect on a command's side: the daemon does, in its own process.
"""
