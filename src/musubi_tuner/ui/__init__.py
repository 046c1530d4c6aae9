"""The studio: a local web app over the same library and commands (dataset, plan, train, generate).

    python bootstrap.py ui            # or, once installed with the `ui` extra: musubi-ui --workspace studio

Pages are rendered by the server (Starlette + Jinja2) with a little JavaScript that polls JSON endpoints. Every
command runs as a child process exactly as a user would type it; the pages only build the command line, start it,
and read what it writes. See docs/ui.md.
"""
