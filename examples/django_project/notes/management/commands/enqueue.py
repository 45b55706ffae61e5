"""Enqueue work from Django and print what the worker answers: `python manage.py enqueue`."""

from django.core.management.base import BaseCommand, CommandError

from notes.tasks import NoteError, add, count_notes, create_note, fail, process_notes, whoami


class Command(BaseCommand):
    help = "Send tasks to the Celery worker and print their results."

    def add_arguments(self, parser):
        parser.add_argument("--count", type=int, default=3, help="notes to create")

    def handle(self, *args, count, **options):
        ok = True
        total = add.delay(2, 3).get(timeout=30)
        self.stdout.write(f"add(2, 3) = {total}")
        ok &= total == 5
        ids = [r.get(timeout=30) for r in [create_note.delay(f"hello {i}") for i in range(count)]]
        self.stdout.write(f"create_note x{count} = {ids}")
        ok &= len(set(ids)) == count
        processed = process_notes.delay().get(timeout=30)
        self.stdout.write(f"process_notes() = {processed}")
        ok &= processed >= count
        me = whoami.delay().get(timeout=30)
        self.stdout.write(f"whoami() ran on {me['hostname']}")
        try:
            fail.delay("on purpose").get(timeout=30)
            ok = False
        except NoteError as exc:
            self.stdout.write(f"fail() raised NoteError({exc})")
        notes = count_notes.delay().get(timeout=30)
        self.stdout.write(f"count_notes = {notes}")
        ok &= notes >= count
        if not ok:
            raise CommandError("unexpected results")
