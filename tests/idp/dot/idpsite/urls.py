"""URLs: django-oauth-toolkit under /o/ (as its documentation mounts it), the site's API under /api/."""
from django.urls import include, path

from xmppsite import views

urlpatterns = [
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    path("api/xmpp/check/<str:user>", views.check, name="xmpp-check"),
]
