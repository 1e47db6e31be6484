"""HTTP views: the chat pages, and two plain (sync) views that use the channel layer.

``announce`` and ``job`` are ordinary ``def`` views, the way most Django code talks to
Channels: through ``async_to_sync`` from a worker thread.
"""

from __future__ import annotations

from asgiref.sync import async_to_sync
from channels.layers import BaseChannelLayer, get_channel_layer
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from testproject.chat.rooms import MAX_TEXT, ProcessInfo, clean_text, process_info, room_group
from testproject.chat.workers import JOBS_CHANNEL

__all__ = ["announce", "index", "job", "room", "status_access", "who"]

SUGGESTED_ROOMS = ["lobby", "random", "support"]


def status_access(request: HttpRequest) -> bool:
    """Who may see the backplane status page here: anyone on this machine, in DEBUG.

    testproject has no users (no database); a real project keeps the default rule,
    staff users only.
    """
    from django.conf import settings

    return bool(settings.DEBUG) and request.META.get("REMOTE_ADDR") in {"127.0.0.1", "::1"}


def _server(request: HttpRequest) -> ProcessInfo:
    """This process, and the address the request came in on."""
    return process_info("server", f"{request.META['SERVER_NAME']}:{request.META['SERVER_PORT']}")


def _text_and_layer(request: HttpRequest) -> tuple[str, BaseChannelLayer] | JsonResponse:
    text = clean_text(request.POST.get("text"))
    if text is None:
        return JsonResponse(
            {"error": f"text must be a non-empty string of at most {MAX_TEXT} characters"},
            status=400,
        )
    layer = get_channel_layer()
    if layer is None:
        return JsonResponse({"error": "no channel layer is configured"}, status=503)
    return text, layer


@require_GET
def index(request: HttpRequest) -> HttpResponse:
    """The room list and a form to enter any room."""
    context = {"rooms": SUGGESTED_ROOMS, "server": _server(request)}
    return render(request, "chat/index.html", context)


@require_GET
def room(request: HttpRequest, room: str) -> HttpResponse:
    """A room: messages, a message box, and buttons for the announce and job views."""
    return render(request, "chat/room.html", {"room": room, "server": _server(request)})


@csrf_exempt
@require_POST
def announce(request: HttpRequest, room: str) -> JsonResponse:
    """POST ``text``: announce it to everybody in the room, through ``group_send`` (with
    ``everywhere``: in every suggested room too, through one ``group_send_many``)."""
    checked = _text_and_layer(request)
    if isinstance(checked, JsonResponse):
        return checked
    text, layer = checked
    sender = _server(request)
    message = {
        "type": "chat.message",
        "kind": "announce",
        "room": room,
        "author": "announcement",
        "text": text,
        "sender": sender,
    }
    if request.POST.get("everywhere") and hasattr(layer, "group_send_many"):
        # One call, one envelope, every room: this room and the suggested ones.
        rooms = list(dict.fromkeys([room, *SUGGESTED_ROOMS]))
        async_to_sync(layer.group_send_many)([room_group(r) for r in rooms], message)
        return JsonResponse({"ok": True, "rooms": rooms, "sender": sender})
    async_to_sync(layer.group_send)(room_group(room), message)
    return JsonResponse({"ok": True, "room": room, "sender": sender})


@require_GET
def who(request: HttpRequest, room: str) -> JsonResponse:
    """How many are in the room across the cluster, as the live processes count them."""
    layer = get_channel_layer()
    if layer is None or not hasattr(layer, "group_size"):
        return JsonResponse({"error": "the channel layer can't count a group"}, status=501)
    snapshot = async_to_sync(layer.group_size)(room_group(room), timeout=0.3)
    # The processes that answered, but this view's own (it holds no chat members
    # unless it is also a server of the room's clients).
    processes = sum(1 for count in snapshot.instances.values() if count)
    return JsonResponse({"room": room, "size": snapshot.size, "processes": processes})


@csrf_exempt
@require_POST
def job(request: HttpRequest, room: str) -> JsonResponse:
    """POST ``text``: queue a job on the ``chat-jobs`` worker channel; the room gets the result."""
    checked = _text_and_layer(request)
    if isinstance(checked, JsonResponse):
        return checked
    text, layer = checked
    sender = _server(request)
    async_to_sync(layer.send)(
        JOBS_CHANNEL,
        {"type": "chat.job", "room": room, "text": text, "requested_by": sender},
    )
    return JsonResponse({"ok": True, "room": room, "queued": JOBS_CHANNEL}, status=202)
