/* Personal GPTs chat bubble. Add to any page:
 *   <script src="https://HOST/embed.js" data-gpt="gpt_..." async></script>
 * Optional: data-position="bottom-left|bottom-right", data-color="#2563eb",
 * data-open="true|false", data-label="Chat with us".
 * It draws a button that opens the GPT's chat (served by HOST) in an iframe. The chat
 * appears only on sites the GPT's creator listed. Plain JavaScript, no dependencies;
 * it never inserts HTML strings into your page. */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || !script.src) { return; }
  var gpt = script.getAttribute("data-gpt") || "";
  if (!/^gpt_[0-9a-f]{8,32}$/.test(gpt)) {
    if (window.console) { console.warn("Personal GPTs: data-gpt is missing or is not a GPT id."); }
    return;
  }
  var base = new URL(script.src, location.href).origin;
  var instanceKey = "__pgptEmbed_" + gpt;
  if (window[instanceKey]) { return; }
  window[instanceKey] = true;

  function attr(name) { var v = script.getAttribute(name); return v === null ? null : String(v); }
  function validColour(v) { return typeof v === "string" && /^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$/.test(v); }

  function draw(settings) {
    var position = attr("data-position") || settings.position || "bottom-right";
    if (position !== "bottom-left") { position = "bottom-right"; }
    var colour = validColour(attr("data-color")) ? attr("data-color") : (validColour(settings.colour) ? settings.colour : "#2563eb");
    var openAttr = attr("data-open");
    var openOnLoad = openAttr === null ? settings.open_on_load === true : openAttr === "true";
    var label = attr("data-label") || ("Chat with " + (settings.title || settings.name || "us"));
    var side = position === "bottom-left" ? "left" : "right";

    var host = document.createElement("div");
    host.setAttribute("data-pgpt-widget", gpt);
    var root = host.attachShadow ? host.attachShadow({ mode: "open" }) : host;

    var button = document.createElement("button");
    button.type = "button";
    button.setAttribute("aria-label", label);
    button.setAttribute("aria-expanded", "false");
    button.setAttribute("aria-haspopup", "dialog");
    button.title = label;
    button.textContent = settings.avatar || "\uD83D\uDCAC";
    var b = button.style;
    b.position = "fixed"; b.bottom = "20px"; b[side] = "20px"; b.zIndex = "2147483000";
    b.width = "56px"; b.height = "56px"; b.borderRadius = "50%"; b.border = "none"; b.cursor = "pointer";
    b.background = colour; b.color = "#fff"; b.fontSize = "26px"; b.lineHeight = "56px"; b.padding = "0";
    b.boxShadow = "0 4px 14px rgba(0,0,0,.25)";

    var panel = document.createElement("div");
    panel.setAttribute("role", "dialog");
    panel.setAttribute("aria-label", label);
    panel.hidden = true;
    var frame = document.createElement("iframe");
    frame.title = label;
    frame.setAttribute("allow", "clipboard-write");
    frame.style.border = "none"; frame.style.width = "100%"; frame.style.height = "100%"; frame.style.display = "block";
    panel.appendChild(frame);

    var small = window.matchMedia ? window.matchMedia("(max-width: 479px)") : null;
    function layout() {
      var p = panel.style;
      p.position = "fixed"; p.zIndex = "2147483001"; p.background = "#fff"; p.overflow = "hidden";
      p.boxShadow = "0 8px 30px rgba(0,0,0,.3)";
      if (small && small.matches) {           /* phones: a full-screen panel */
        p.top = "0"; p.left = "0"; p.right = "0"; p.bottom = "0"; p.width = "100%"; p.height = "100%";
        p.borderRadius = "0";
      } else {
        p.top = "auto"; p.bottom = "88px"; p.left = side === "left" ? "20px" : "auto";
        p.right = side === "right" ? "20px" : "auto";
        p.width = "380px"; p.height = "min(600px, calc(100vh - 110px))"; p.borderRadius = "14px";
      }
    }
    layout();
    if (small) {
      if (small.addEventListener) { small.addEventListener("change", layout); } else if (small.addListener) { small.addListener(layout); }
    }

    var loaded = false;
    function open() {
      if (!loaded) {
        var url = new URL(base + "/embed/" + encodeURIComponent(gpt));
        url.searchParams.set("site", location.origin);
        url.searchParams.set("widget", "1");
        frame.src = url.toString();
        loaded = true;
      }
      panel.hidden = false;
      button.setAttribute("aria-expanded", "true");
      if (small && small.matches) { button.style.display = "none"; }
      setTimeout(function () { try { frame.focus(); } catch (e) { /* ignore */ } }, 50);
    }
    function close() {
      if (panel.hidden) { return; }
      panel.hidden = true;
      button.style.display = "";
      button.setAttribute("aria-expanded", "false");
      button.focus();
    }
    button.addEventListener("click", function () { if (panel.hidden) { open(); } else { close(); } });
    document.addEventListener("keydown", function (e) { if (e.key === "Escape") { close(); } });
    window.addEventListener("message", function (e) {
      /* only our own chat frame may ask to close */
      if (e.origin !== base || e.source !== frame.contentWindow) { return; }
      if (e.data && e.data.type === "pgpt-embed-close") { close(); }
    });

    root.appendChild(panel);
    root.appendChild(button);
    (document.body || document.documentElement).appendChild(host);
    if (openOnLoad) { open(); }
  }

  var url = base + "/embed/" + encodeURIComponent(gpt) + "/widget.json";
  fetch(url, { credentials: "omit", mode: "cors" }).then(function (r) {
    if (!r.ok) { throw new Error("status " + r.status); }
    return r.json();
  }).then(function (settings) {
    function go() { draw(settings || {}); }
    if (document.body) { go(); } else { document.addEventListener("DOMContentLoaded", go); }
  }).catch(function () {
    if (window.console) {
      console.warn("Personal GPTs: this chat is not available on " + location.origin +
        " (the site is not on the GPT's list of allowed sites, or the GPT is not published).");
    }
  });
})();
