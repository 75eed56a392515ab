"""What a run tells: the per-module report and its renderings (JSON, Markdown, terminal, HTML), the model card, and the
audit gate that reads reports.
"""
