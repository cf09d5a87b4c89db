from django.contrib.auth import views as auth
from django.urls import path
from django.views.generic import RedirectView

from chat.views import chat_page, content_security_policy

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="chat"), name="home"),
    path("chat/", chat_page, name="chat"),
    path(
        "accounts/login/",
        content_security_policy(auth.LoginView.as_view(redirect_authenticated_user=True)),
        name="login",
    ),
    path("accounts/logout/", auth.LogoutView.as_view(), name="logout"),
]
