"""One run, start to summary.

Takes a job config, the key and run options; gives the rows of the run in the store and a
`summary.RunSummary`. The order of a run is the order of this package:

    engine     setup (locks, recovery, the done-index), the dispatch queue, the end
               (`Pipeline`, `RunOptions`, `run_job`, `run_pipeline`: no Prefect inside)
    subset     which documents and pages a run is limited to (eval's labelled units)
    earlier    what earlier runs leave to do: the done-index, inputs given up on (`EarlierWork`)
    duplicates same content at several paths: sent once, duplicate rows (`SameContent`)
    selected   every unit the run selected, so the counts add up (`SelectedUnits`)
    sender     one unit from its first request to its row: the layered retry policy
    rows       typed rows from results
    recorder   journal first, then table buffers; progress and the one manifest builder
    recovery   folding killed runs' journals (`fold_dead_run`)
    rebuild    `documents --rebuild`
    compact    `ernie-batch compact` (folds dead journals first, so it lives here, not in `store`)
    interrupt  Ctrl-C and SIGTERM: stop dispatching, a grace for requests in flight
    progress, summary  what a run reports while it runs and when it ends
    selection  which runs `report`, `reconcile`, `review`, `documents` look at (`RunSelection`)

It uses `intake`, `api`, `answers` and `store`; none of them imports it. The package's own
import is empty on purpose.
"""
