"""The API: one vendor, one limit.

Takes a request body and gives a classified response (`client.CallResult`: ok, 429, 5xx,
transport, 400, fatal) with its cost read from the headers before the body, sent within
the key's limit.

    limits       the request budget every request of a run shares (`RequestBudget`: RPM/TPM
                 sliding windows, in-flight cap, the shared pause, AIMD on 429)
    lease        one request's permission, handed back once (`Lease`)
    refusals     which 429s follow the rate (a limit's) and which do not (sporadic)
    pacer        one sliding-window pacer (the budget's and the usage logs' clock)
    retry_after  how long a refusal asks us to wait
    client       the HTTP client (`ApiClient`, `CallResult`, `check_base_url`)
    request_ids  the `X-Client-Request-Id` of each attempt, and read back
    tokens       token estimates shared by the budget, `plan` and the simulator
    usage_logs   the vendor's usage logs, paged within the endpoint's limits (`UsageLogsClient`)

Nothing here imports a later stage; the package's own import is empty on purpose.
"""
