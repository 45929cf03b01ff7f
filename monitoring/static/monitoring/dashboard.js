// The dashboard's only script: poll state.json for the schedules on screen and redraw their state and
// run strips; the buttons POST with the page's CSRF token. No framework, no build step.
(function () {
  "use strict";
  var POLL_MS = 1000;
  var table = document.querySelector("[data-poll]");
  var csrf = document.querySelector("input[name=csrfmiddlewaretoken]");

  function el(tag, attrs) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    return node;
  }

  function drawState(target, s) {
    target.textContent = "";
    if (s.alerts.length) {
      var a = el("span", { class: "badge alerting" });
      a.textContent = "alerting: " + s.alerts.join(", ");
      target.appendChild(a);
      target.appendChild(document.createTextNode(" "));
    }
    var badge = el("span", { class: "badge " + (s.enabled ? "enabled" : "paused") });
    badge.textContent = s.enabled ? "enabled" : "paused";
    target.appendChild(badge);
    if (!s.enabled && s.paused_note) {
      target.appendChild(document.createTextNode(" "));
      var note = el("span", { class: "note", "data-note": "" });
      note.textContent = s.paused_note;
      target.appendChild(note);
    }
  }

  function drawStrip(target, cells) {
    target.textContent = "";
    cells.forEach(function (c) {
      var attrs = { class: "cell s-" + c.status, "data-status": c.status, "data-id": String(c.id),
        title: c.status + " · " + c.trigger + " · " + c.scheduled_for };
      if (c.run_id) { attrs.href = "/dashboard/runs/" + c.run_id + "/"; }
      target.appendChild(el("a", attrs));
    });
  }

  function poll() {
    var rows = document.querySelectorAll("[data-schedule]");
    var ids = Array.prototype.map.call(rows, function (r) { return r.getAttribute("data-schedule"); });
    if (!table || !ids.length) { return; }
    fetch(table.getAttribute("data-poll") + "?ids=" + ids.join(","), { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (body) {
        if (!body) { return; }
        body.schedules.forEach(function (s) {
          var row = document.querySelector("[data-schedule='" + s.id + "']");
          if (!row) { return; }
          // A list row holds its own strip; the schedule page's strip is in its facts table.
          var scope = row.querySelector("[data-strip]") ? row : row.closest("table");
          var state = row.querySelector("[data-state]");
          var strip = scope.querySelector("[data-strip]");
          if (state) { drawState(state, s); }
          // Only the button that changes something: Enable on a paused schedule, Disable on an enabled one.
          var enable = row.querySelector("button[data-kind=enable]");
          var disable = row.querySelector("button[data-kind=disable]");
          if (enable) { enable.hidden = s.enabled; }
          if (disable) { disable.hidden = !s.enabled; }
          if (strip) { drawStrip(strip, s.strip); }
        });
      })
      .catch(function () { /* the next poll tries again */ })
      .then(function () { window.setTimeout(poll, POLL_MS); });
  }

  // A refusal's reasons as the server gives them ({"detail": ...} or {"field": ["message", ...]}).
  function refused(r) {
    return r.json().catch(function () { return {}; }).then(function (body) {
      var reasons = Object.keys(body).map(function (key) {
        return key === "detail" ? body[key] : key + ": " + [].concat(body[key]).join(" ");
      });
      window.alert("Refused (" + r.status + ")" + (reasons.length ? ": " + reasons.join("; ") : ""));
    });
  }

  function press(button) {
    var body = new URLSearchParams();
    var kind = button.getAttribute("data-kind");
    if (kind === "cancel" && !window.confirm("Cancel this run? A running one gets SIGTERM, then SIGKILL.")) {
      return;
    }
    if (kind === "disable") {
      var note = window.prompt("Why pause it? (shown on the dashboard)", "");
      if (note === null) { return; }
      body.set("note", note);
    }
    if (kind === "run-now-params") {
      // The schedule's params as JSON; the keys sent replace theirs for this run (checked by the server).
      var params = window.prompt("Params for this run (JSON; keys replace the schedule's)",
        button.getAttribute("data-params") || "{}");
      if (params === null) { return; }
      body.set("params", params);
    }
    button.disabled = true;
    fetch(button.getAttribute("data-action"), {
      method: "POST", credentials: "same-origin", body: body,
      headers: { "X-CSRFToken": csrf ? csrf.value : "" }
    }).then(function (r) {
      button.disabled = false;
      if (!r.ok) { return refused(r); }
      if (kind === "cancel") { window.location.reload(); }
    });
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-action]");
    if (button) { event.preventDefault(); press(button); }
    // The list's "select all on this page" box ticks the rows' boxes for the bulk form.
    if (event.target.matches("[data-select-all]")) {
      document.querySelectorAll("input[name=ids]").forEach(function (box) { box.checked = event.target.checked; });
    }
  });
  var bulk = document.getElementById("bulk");
  if (bulk) {
    bulk.addEventListener("submit", function (event) {
      var count = document.querySelectorAll("input[name=ids]:checked").length;
      var action = bulk.querySelector("select[name=action]").value;
      if (action === "delete" && !window.confirm("Delete " + count + " schedule(s)? Their history goes too.")) {
        event.preventDefault();
      }
    });
  }
  // The calendar's "my zone" button: the browser's IANA zone into the tz field.
  var myZone = document.querySelector("[data-my-zone]");
  if (myZone) {
    myZone.addEventListener("click", function () {
      document.querySelector("[data-zone]").value = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
    });
  }
  window.setTimeout(poll, POLL_MS);
})();
