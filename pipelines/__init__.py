"""KFP pipelines: one factory per file."""
