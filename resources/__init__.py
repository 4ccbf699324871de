"""Dagster resources, one module per role. Each role is one small interface; the profile
(``orchestration.profiles``) picks the implementation."""
