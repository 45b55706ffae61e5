from celery import shared_task

from .models import Note


class NoteError(Exception):
    pass


@shared_task
def add(x, y):
    return x + y


@shared_task
def create_note(text):
    return Note.objects.create(text=text).id


@shared_task
def process_notes():
    return Note.objects.filter(processed=False).update(processed=True)


@shared_task
def count_notes():
    return Note.objects.count()


@shared_task(bind=True)
def whoami(self):
    return {"id": self.request.id, "hostname": self.request.hostname, "retries": self.request.retries}


@shared_task
def fail(message):
    raise NoteError(message)
