"""Money: what a run will cost, what it cost, what was billed.

    plan         counts and estimates before a run (`make_plan`): the engine's own done-index
                 questions, prices by document type
    calibration  what a unit of each document type cost earlier runs (`learn`)
    report       totals after it: by run, day, folder, status, document (`dataset_report`)
    billing      the `billing` table: the vendor's usage-log rows, one per inference
    reconcile    every recorded credit against the vendor's usage logs (`reconcile_runs`)

Reads the store and the run selection (`run.selection`); the engine never imports it. The
package's own import is empty on purpose.
"""
