/* The chat page inside the Personal GPTs widget iframe (/embed/<gpt_id>).
 * Config comes from the page's JSON block; every call goes to our own origin.
 * Visitor text and streamed pieces are shown with textContent only; a finished answer
 * is the server's sanitized HTML (personal_gpt.markdown_safe), parsed with DOMParser,
 * and the page's Content-Security-Policy allows no inline script either way. */
(function () {
  "use strict";
  var config = JSON.parse(document.getElementById("pgpt-config").textContent);
  var gpt = config.gpt;
  var base = "/embed/" + encodeURIComponent(gpt);
  var app = document.getElementById("app");
  var theme = config.theme || {};
  var token = null;
  var conversation = null;
  var busy = false;

  function site() {
    try {
      if (location.ancestorOrigins && location.ancestorOrigins.length) {
        return location.ancestorOrigins[0];  /* the page that shows the widget */
      }
    } catch (e) { /* ignore */ }
    if (config.site) { return config.site; }
    try { if (document.referrer) { return new URL(document.referrer).origin; } } catch (e) { /* ignore */ }
    return config.own_origin;
  }

  var store = {
    get: function (k) { try { return window.localStorage.getItem(k); } catch (e) { return store.mem[k] || null; } },
    set: function (k, v) { try { window.localStorage.setItem(k, v); } catch (e) { store.mem[k] = v; } },
    del: function (k) { try { window.localStorage.removeItem(k); } catch (e) { delete store.mem[k]; } },
    mem: {}
  };
  var VISITOR_KEY = "pgpt-embed-visitor";
  var CONV_KEY = "pgpt-embed-conversation:" + gpt;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = text; }
    return e;
  }

  document.documentElement.style.setProperty("--accent", /^#[0-9a-fA-F]{6}$/.test(theme.colour || "") ? theme.colour : "#2563eb");

  /* --- layout --- */
  var header = el("header", "head");
  header.appendChild(el("span", "avatar", theme.avatar || config.avatar || "\uD83E\uDD16"));
  var titles = el("div", "titles");
  titles.appendChild(el("h1", "title", theme.title || config.name));
  if (config.description) { titles.appendChild(el("p", "desc", config.description)); }
  header.appendChild(titles);
  var newChat = el("button", "icon", "New chat");
  newChat.type = "button";
  header.appendChild(newChat);
  if (config.widget && window.parent !== window) {
    var closeBtn = el("button", "icon close", "\u2715");
    closeBtn.type = "button";
    closeBtn.setAttribute("aria-label", "Close chat");
    closeBtn.addEventListener("click", function () { window.parent.postMessage({ type: "pgpt-embed-close" }, "*"); });
    header.appendChild(closeBtn);
  }
  var log = el("div", "log");
  log.setAttribute("role", "log");
  log.setAttribute("aria-live", "polite");
  var notice = el("div", "notice");
  notice.setAttribute("role", "status");
  notice.hidden = true;
  var form = el("form", "composer");
  var input = el("textarea", "input");
  input.rows = 1;
  input.setAttribute("aria-label", "Your message");
  input.placeholder = "Type a message…";
  var send = el("button", "send", "Send");
  send.type = "submit";
  form.appendChild(input);
  form.appendChild(send);
  var signin = el("div", "signin");
  signin.hidden = true;
  app.appendChild(header);
  app.appendChild(log);
  app.appendChild(notice);
  app.appendChild(signin);
  app.appendChild(form);

  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape" && config.widget && window.parent !== window) {
      window.parent.postMessage({ type: "pgpt-embed-close" }, "*");
    }
  });

  function say(text) { notice.textContent = text || ""; notice.hidden = !text; }
  function scroll() { log.scrollTop = log.scrollHeight; }

  function greeting() {
    log.replaceChildren();
    if (theme.greeting) { addMessage("assistant", theme.greeting); }
    if (config.starters && config.starters.length) {
      var list = el("div", "starters");
      config.starters.forEach(function (s) {
        var b = el("button", "starter", s);
        b.type = "button";
        b.addEventListener("click", function () { list.remove(); ask(s); });
        list.appendChild(b);
      });
      log.appendChild(list);
    }
  }

  function addMessage(role, text) {
    var m = el("div", "msg " + role);
    var body = el("div", "body", text);
    m.appendChild(body);
    log.appendChild(m);
    scroll();
    return m;
  }

  function showHtml(m, html, citations) {
    var body = m.querySelector(".body");
    var doc = new DOMParser().parseFromString("<body>" + (html || "") + "</body>", "text/html");
    body.replaceChildren.apply(body, Array.prototype.slice.call(doc.body.childNodes));
    Array.prototype.forEach.call(body.querySelectorAll("a"), function (a) {
      a.setAttribute("target", "_blank");
      a.setAttribute("rel", "noopener noreferrer nofollow");
    });
    if (citations && citations.length) {
      var list = el("ol", "cites");
      list.setAttribute("aria-label", "Sources");
      citations.forEach(function (c) {
        var li = el("li", "cite");
        var where = (c.file || "source") + (c.page ? ", page " + c.page : "") + (c.section ? " — " + c.section : "");
        li.appendChild(el("span", "where", where));
        if (c.quote) { li.appendChild(el("q", "quote", c.quote)); }
        list.appendChild(li);
      });
      m.appendChild(list);
    }
    scroll();
  }

  /* --- feedback on an answer: thumbs (aria-pressed) and an optional comment --- */
  function addFeedback(m, messageId, rating) {
    if (!messageId || m.querySelector(".rate")) { return; }
    var box = el("div", "rate");
    var current = rating === 1 || rating === -1 ? rating : null;
    var up = el("button", "thumb", "\uD83D\uDC4D");
    var down = el("button", "thumb", "\uD83D\uDC4E");
    up.type = "button"; down.type = "button";
    up.setAttribute("aria-label", "Good answer");
    down.setAttribute("aria-label", "Bad answer");
    var more = el("form", "rate-comment");
    more.hidden = true;
    var note = el("input", "rate-input");
    note.type = "text"; note.maxLength = 1000;
    note.setAttribute("aria-label", "What was wrong or right about this answer? (optional)");
    note.placeholder = "Tell us more (optional)";
    var sendNote = el("button", "rate-send", "Send");
    sendNote.type = "submit";
    more.appendChild(note); more.appendChild(sendNote);
    var thanks = el("span", "rate-thanks");
    thanks.setAttribute("role", "status");
    function show() {
      up.setAttribute("aria-pressed", current === 1 ? "true" : "false");
      down.setAttribute("aria-pressed", current === -1 ? "true" : "false");
    }
    function post(value, comment) {
      return call("POST", base + "/feedback", {
        conversation: conversation, message: messageId, rating: value, comment: comment || ""
      });
    }
    function choose(value) {
      post(value, "").then(function () {
        current = value; show();
        thanks.textContent = "Thanks for your feedback.";
        more.hidden = false;
      }).catch(handle);
    }
    up.addEventListener("click", function () { choose(1); });
    down.addEventListener("click", function () { choose(-1); });
    more.addEventListener("submit", function (e) {
      e.preventDefault();
      if (current === null) { return; }
      post(current, note.value).then(function () {
        more.hidden = true;
        thanks.textContent = "Thanks — your comment was sent.";
      }).catch(handle);
    });
    show();
    box.appendChild(up); box.appendChild(down); box.appendChild(thanks); box.appendChild(more);
    m.appendChild(box);
  }

  /* --- calls --- */
  function headers(json) {
    var h = {};
    if (json) { h["Content-Type"] = "application/json"; }
    var v = store.get(VISITOR_KEY);
    if (v) { h["X-Pgpt-Visitor"] = v; }
    if (token) { h["Authorization"] = "Bearer " + token; }
    return h;
  }

  function friendly(status, err) {
    var e = (err && err.error) || {};
    if (status === 429) {
      var n = e.retry_after || 60;
      return "You're sending messages quickly — try again in " + n + " second" + (n === 1 ? "" : "s") + ".";
    }
    if (status === 401 && e.code === "sign_in") { return e.message || "Sign in to chat."; }
    if (status === 404) { return e.message || "This chat is not available."; }
    return e.message || "Something went wrong. Please try again.";
  }

  function call(method, path, body) {
    return fetch(path, {
      method: method, headers: headers(body !== undefined), credentials: "omit",
      body: body === undefined ? undefined : JSON.stringify(body)
    }).then(function (r) {
      if (r.ok) { return r.json(); }
      return r.json().catch(function () { return {}; }).then(function (err) {
        var x = new Error(friendly(r.status, err));
        x.status = r.status; x.code = err && err.error && err.error.code;
        throw x;
      });
    });
  }

  function ensureVisitor() {
    if (store.get(VISITOR_KEY)) { return Promise.resolve(); }
    return call("POST", base + "/visitor", {}).then(function (d) { store.set(VISITOR_KEY, d.visitor); });
  }

  function ensureConversation() {
    if (conversation) { return Promise.resolve(conversation); }
    return call("POST", base + "/conversations", { site: site() }).then(function (d) {
      conversation = d.conversation;
      store.set(CONV_KEY, conversation);
      return conversation;
    });
  }

  function handle(err) {
    if (err && err.status === 401) { needSignIn(err.message); }
    else if (err && err.status === 400 && /recognise your browser/.test(err.message || "")) {
      store.del(VISITOR_KEY);
      say(err.message);
    } else { say(err && err.message ? err.message : "Something went wrong. Please try again."); }
  }

  function ask(text) {
    text = (text || "").trim();
    if (!text || busy) { return; }
    busy = true; send.disabled = true; say("");
    addMessage("user", text);
    var answer = null;
    ensureVisitor().then(ensureConversation).then(function (conv) {
      return fetch(base + "/chat", {
        method: "POST", headers: headers(true), credentials: "omit",
        body: JSON.stringify({ conversation: conv, message: text })
      });
    }).then(function (r) {
      if (!r.ok) {
        return r.json().catch(function () { return {}; }).then(function (err) {
          var x = new Error(friendly(r.status, err)); x.status = r.status; throw x;
        });
      }
      answer = addMessage("assistant", "");
      answer.classList.add("streaming");
      return readEvents(r, answer);
    }).catch(function (err) {
      if (answer) { answer.classList.remove("streaming"); }
      handle(err);
    }).then(function () {
      busy = false; send.disabled = false;
      if (!signin.hidden) { return; }
      input.focus();
    });
  }

  function readEvents(response, m) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    var body = m.querySelector(".body");
    var text = "";
    function handleEvent(block) {
      var event = "message", data = "";
      block.split("\n").forEach(function (line) {
        if (line.indexOf("event:") === 0) { event = line.slice(6).trim(); }
        else if (line.indexOf("data:") === 0) { data += line.slice(5).trim(); }
      });
      var payload = {};
      try { payload = JSON.parse(data || "{}"); } catch (e) { return; }
      if (event === "piece") { text += payload.text || ""; body.textContent = text; scroll(); }
      else if (event === "done") {
        m.classList.remove("streaming"); showHtml(m, payload.html, payload.citations);
        if (payload.id) { addFeedback(m, payload.id, null); }
      }
      else if (event === "error") { m.classList.remove("streaming"); say(payload.message || "Something went wrong."); }
    }
    function pump() {
      return reader.read().then(function (chunk) {
        if (chunk.done) { m.classList.remove("streaming"); return; }
        buffer += decoder.decode(chunk.value, { stream: true });
        var parts = buffer.split("\n\n");
        buffer = parts.pop();
        parts.forEach(handleEvent);
        return pump();
      });
    }
    return pump();
  }

  /* --- sign-in (policy "signin") --- */
  var popup = null;
  function needSignIn(message) {
    token = null;
    signin.replaceChildren();
    signin.appendChild(el("p", null, message || "Sign in to chat."));
    var b = el("button", "send", "Sign in");
    b.type = "button";
    b.addEventListener("click", function () {
      popup = window.open(base + "/signin", "pgpt-signin", "popup,width=480,height=640");
      if (!popup) { say("Allow pop-ups for this site to sign in."); }
    });
    signin.appendChild(b);
    signin.hidden = false;
    form.hidden = true;
  }
  window.addEventListener("message", function (e) {
    if (e.origin !== location.origin || !e.data || e.data.type !== "pgpt-embed-token" || e.data.gpt !== gpt) { return; }
    if (popup && e.source !== popup) { return; }
    token = String(e.data.token || "");
    signin.hidden = true; form.hidden = false; say("");
    try { if (popup) { popup.close(); } } catch (err) { /* ignore */ }
    restore();
    input.focus();
  });

  function restore() {
    var saved = store.get(CONV_KEY);
    if (!saved) { greeting(); return; }
    ensureVisitor().then(function () {
      return call("GET", base + "/conversations/" + encodeURIComponent(saved));
    }).then(function (d) {
      conversation = saved;
      log.replaceChildren();
      if (theme.greeting) { addMessage("assistant", theme.greeting); }
      (d.messages || []).forEach(function (msg) {
        var m = addMessage(msg.role, msg.text);
        if (msg.role === "assistant" && msg.html !== null) {
          showHtml(m, msg.html, msg.citations);
          addFeedback(m, msg.id, msg.rating);
        }
      });
    }).catch(function (err) {
      store.del(CONV_KEY);
      conversation = null;
      greeting();
      if (err && err.status === 401) { needSignIn(err.message); }
    });
  }

  newChat.addEventListener("click", function () {
    conversation = null; store.del(CONV_KEY); say(""); greeting(); input.focus();
  });
  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var text = input.value;
    input.value = "";
    ask(text);
  });
  input.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); form.requestSubmit ? form.requestSubmit() : ask(input.value); }
  });

  if (config.policy === "signin") { greeting(); needSignIn("Sign in to chat with " + config.name + "."); }
  else { restore(); }
})();
