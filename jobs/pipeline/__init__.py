"""The stage framework: declared stages, the runner, the LLM step with its spool, progress, usage and cost."""
