"""Wire models of every API, one module per API: `openai` (the tenant API), `admin`,
`fine_tuning`, and `common` (the error object and list envelopes shared by all)."""
