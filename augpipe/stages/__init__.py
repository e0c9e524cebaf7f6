"""Stages: one module per stage, named as the stage (``augpipe.stages.transcribe`` is ``transcribe``); a stage
with several backends is a package of that name with one module per backend."""
