"""Answers: from the model's text to fields, and from pages to documents.

Takes the prompt template and schema of a job and a model's response; gives the request's
text (`prompt`), a validated answer with typed `answer_<field>` columns (`judge`), and the
documents merged from their pages' answers by the schema's rules (`documents`, `merge`).

    template   the template check, its built-in variables, the resolved prompt value (`ResolvedPrompt`)
    prompt     the request body, the fingerprint and unit keys (`fingerprint`, `unit_key`)
    judge      JSON extraction, validation, answer columns (`judge`, `Verdict`, `answer_fields`)
    merge      the `x-merge` rules and the pure merge of page answers
    documents  the `documents` rows of the documents a run touched (`build_documents`)

Nothing here imports the engine's package (`run`); the package's own import is empty on
purpose.
"""
