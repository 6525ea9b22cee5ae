// The dashboard's one script: live output through server-sent events. Every page works without it
// (the output pages then show what there was when they were loaded).
"use strict";
(function () {
  var list = document.getElementById("output");
  if (!list || !window.EventSource) return;
  var state = document.getElementById("live");
  var url = list.getAttribute("data-stream");
  var last = list.getAttribute("data-after") || "";
  var source = null;
  var failures = 0;
  function show(text, on) {
    if (!state) return;
    state.textContent = text;
    state.className = on ? "live on" : "live";
  }
  function append(line) {
    var li = document.createElement("li");
    li.className = line.stream;
    var origin = document.createElement("span");
    origin.className = "origin";
    origin.textContent = line.origin;
    var text = document.createElement("span");
    text.className = "text";
    text.textContent = line.text;
    li.appendChild(origin);
    li.appendChild(text);
    list.appendChild(li);
  }
  function connect() {
    // A first connection names the page's cursor; the browser's own reconnections (the server ends a
    // stream every few minutes) send Last-Event-ID, which the server prefers.
    source = new EventSource(url + "?after=" + encodeURIComponent(last));
    window.cairnStream = source;
    source.onopen = function () {
      failures = 0;
      window.cairnOpens = (window.cairnOpens || 0) + 1;
      show("Live: new lines appear here.", true);
    };
    source.addEventListener("lines", function (e) {
      var follow = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
      JSON.parse(e.data).forEach(append);
      last = e.lastEventId;
      list.setAttribute("data-after", last);
      if (follow) window.scrollTo(0, document.body.scrollHeight);
    });
    source.onerror = function () {
      if (source.readyState === EventSource.CLOSED) {
        // Refused outright (signed out, say): a few tries, then the page says so.
        failures += 1;
        if (failures > 5) {
          show("Disconnected: reload the page.", false);
          return;
        }
        show("Disconnected; reconnecting…", false);
        setTimeout(connect, 2000 * failures);
      } else {
        show("Reconnecting…", false);
      }
    };
  }
  connect();
})();
