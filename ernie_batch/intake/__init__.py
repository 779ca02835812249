"""Intake: from folders to request units.

Takes the sources of a job (folders, files, object-store prefixes) and gives
`units.Document`s (typed by content, hashed) and then `units.PageUnit`s (one-page PDFs or
normalised images, ready to send) or `units.UnitFailure`s (a page that cannot be prepared,
as a row-to-be).

    discover  ─► content types, sha256, globs, ages, dates        (`discover`, `sha256_file`)
    objects   ─► the same under s3:// prefixes: listings with ETags, bytes read only
                 when new to the output, and read again by the workers (`local_copy`)
    prepare   ─► pdf (split, render) and images (rotate, flatten, resize),
                 in killable worker processes                       (`PreparePool`, `prepare_document`)
    content   ─► the media parts of a request and their hashes      (`content_sha256`, `parts_sha256`)
    units     ─► the values handed to the next stage                (`Document`, `PageUnit`, `Prepared`)

Its face is those names; everything else is private to the stage. Nothing here imports a
later stage (`answers`, `run`): the engine asks, intake answers. The package's own import
is empty on purpose: each command loads only the modules it uses.
"""
