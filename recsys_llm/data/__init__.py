"""Data layer: schema, Parquet preparation and streaming, the Batch type."""
