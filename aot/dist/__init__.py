"""Distribution: `aot publish` puts a release's bundles into a content-addressed store (a directory
a static HTTP host can serve, or S3) under one signed index; `aot pull` picks a target from that
index (by name, or by what a phone can run), fetches its blobs into a shared, verified cache with
resume and retries, and lays the bundle out as links into it. docs/distribution.md describes the
layout, docs/index.schema.json the index."""
