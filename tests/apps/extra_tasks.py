"""A task module testapp does not import: `celeriac worker -I extra_tasks` brings it in."""

from testapp import app


@app.task(name="extra_tasks.triple")
def triple(x):
    return 3 * x
