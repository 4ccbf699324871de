"""Code that runs inside a worker (Batch container, SageMaker job, or the local pool).

Imports nothing of cvgraph's other packages and no `dagster`.
"""
