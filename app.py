"""The WSGI entry point: `flask --app app ...` and `gunicorn app:app`."""

from agentcloud_clone import create_app

app = create_app()
