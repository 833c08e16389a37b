"""Prefect flows: orchestration of the DVC graph; the stage logic lives in pipelines/."""
