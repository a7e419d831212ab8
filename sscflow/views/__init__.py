"""What sscflow shows to people: the cohort report and the per-patient QA pages.

The pages are rendered from the jinja2 templates in ``templates/`` (shipped as package data) with
autoescape on: every value from the store or the manifest is escaped by the template engine, never
by hand. :func:`sscflow.views.pages.render` is the one entry point.
"""
