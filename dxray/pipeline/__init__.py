"""The audit's lifecycle, shared by both runners.

- ``tasks``     what to run: TaskSpec, the plan, the scoring prompt
- ``identity``  run ids and task ids (hashes of what defines the results)
- ``preflight`` every check that needs no model weights
- ``ranking``   which features each class's feature tasks explain
- ``explainer`` generator + classifier: optimise and sample a batch (no I/O)
- ``rows``      task / sample / error rows, stage labels, writing a task's images
- ``job``       AuditJob: preflight → prepare → commit → finish
- ``local``     the in-process runner (``dxray explain``); the Ray runner is ``dxray.distributed.audit``
"""
