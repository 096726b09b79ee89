/* The widget's sign-in popup, once signed in: hand the short-lived token to the chat
 * iframe that opened this window, and only if that window is on our own origin
 * (postMessage's target origin) — never to the page around the widget. */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("pgpt-signin").textContent);
  var text = document.getElementById("pgpt-signin-text");
  if (!window.opener) {
    text.textContent = "You are signed in. You can close this window (if a chat asked you to sign in, press Sign in there again).";
    return;
  }
  try {
    window.opener.postMessage({ type: data.type, gpt: data.gpt, token: data.token }, location.origin);
  } catch (e) { /* the opener went away */ }
  setTimeout(function () { window.close(); }, 300);
})();
