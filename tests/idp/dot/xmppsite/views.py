"""The site's own API, as the broker's `kind = "http"` validator asks it."""
from django.http import JsonResponse
from django.views.decorators.http import require_GET
from oauth2_provider.decorators import protected_resource_metadata

from .validators import XmppSiteValidator


@require_GET
@protected_resource_metadata(validator_cls=XmppSiteValidator)
def check(request, user):
    """GET /api/xmpp/check/<user> with `Authorization: Bearer <token>`.

    200 {"user": <the token's username>, "ok": true} when the token is valid and belongs to
    <user> exactly (Django usernames are case-sensitive); 401 with a `WWW-Authenticate: Bearer`
    challenge for a missing, unknown, expired or revoked token (RFC 6750, raised by DOT's
    decorator); 403 {"ok": false} for a valid token of another user or of no user at all (a
    client-credentials token).
    """
    owner = request.resource_owner
    if owner is None or not owner.is_authenticated or owner.get_username() != user:
        return JsonResponse({"ok": False}, status=403)
    return JsonResponse({"user": owner.get_username(), "ok": True})
