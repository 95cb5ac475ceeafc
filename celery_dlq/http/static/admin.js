"use strict";
(function () {
  var base = document.body.dataset.base || "";
  var tbody = document.querySelector("#entries tbody");
  var message = document.getElementById("message");
  var filterForm = document.getElementById("filters");
  var loginForm = document.getElementById("login");
  var more = document.getElementById("more");
  var token = sessionStorage.getItem("celery_dlq_token") || "";
  var cursor = null;

  function say(text, isError) {
    message.textContent = text;
    message.className = isError ? "error" : "";
  }

  function api(method, path, body) {
    var headers = {"Accept": "application/json"};
    if (token) headers["Authorization"] = "Bearer " + token;
    var init = {method: method, headers: headers, credentials: "same-origin"};
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(base + path, init).then(function (resp) {
      return resp.json().catch(function () { return null; }).then(function (data) {
        if (resp.status === 401) loginForm.hidden = false;
        if (!resp.ok) throw new Error((data && data.message) || ("HTTP " + resp.status));
        return data;
      });
    });
  }

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "" : String(text);
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function button(label, name, handler) {
    var b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.className = name;
    b.addEventListener("click", function () { handler(b); });
    return b;
  }

  function when(value) {
    return value ? String(value).replace("T", " ").replace(/\.\d+/, "") : "";
  }

  function row(entry) {
    var tr = document.createElement("tr");
    tr.dataset.id = String(entry.id);
    cell(tr, entry.id, "num");
    cell(tr, entry.task_name, "task");
    cell(tr, entry.queue, "queue");
    cell(tr, entry.reason, "reason");
    var exc = (entry.exception_type || "") + (entry.exception_message ? ": " + entry.exception_message : "");
    var td = cell(tr, exc.length > 300 ? exc.slice(0, 300) + "\u2026" : exc, "exc");
    td.title = exc;
    cell(tr, entry.failure_count, "num failures");
    cell(tr, when(entry.last_failed_at), "when");
    cell(tr, entry.status, "status status-" + entry.status);
    var actions = cell(tr, "", "actions");
    actions.appendChild(button("Requeue", "requeue", function (b) { requeue(entry.id, b); }));
    actions.appendChild(document.createTextNode(" "));
    actions.appendChild(button("Delete", "delete", function (b) { remove(entry.id, b); }));
    return tr;
  }

  function render(page, append) {
    if (!append) tbody.replaceChildren();
    page.rows.forEach(function (entry) { tbody.appendChild(row(entry)); });
    document.getElementById("total").textContent =
      page.total + (page.total === 1 ? " entry matches" : " entries match");
    cursor = page.next_cursor;
    more.hidden = cursor === null || cursor === undefined;
  }

  function query(withCursor) {
    var params = new URLSearchParams();
    Array.prototype.forEach.call(filterForm.elements, function (el) {
      if (el.name && el.value.trim()) params.set(el.name, el.value.trim());
    });
    if (withCursor && cursor) params.set("cursor", String(cursor));
    var text = params.toString();
    return "/api/entries" + (text ? "?" + text : "");
  }

  function load(append) {
    return api("GET", query(append)).then(function (page) {
      render(page, append);
    }).catch(function (err) { say(err.message, true); });
  }

  function requeue(id, b) {
    b.disabled = true;
    api("POST", "/api/entries/" + id + "/requeue", {}).then(function (result) {
      say("Entry " + id + " requeued to " + (result.queues || []).join(", "));
      return load(false);
    }).catch(function (err) { b.disabled = false; say("Entry " + id + ": " + err.message, true); });
  }

  function remove(id, b) {
    if (b.dataset.armed !== "1") {
      b.dataset.armed = "1";
      b.textContent = "Confirm delete";
      return;
    }
    b.disabled = true;
    api("DELETE", "/api/entries/" + id).then(function () {
      say("Entry " + id + " deleted");
      return load(false);
    }).catch(function (err) { b.disabled = false; say("Entry " + id + ": " + err.message, true); });
  }

  filterForm.addEventListener("submit", function (ev) { ev.preventDefault(); say(""); load(false); });
  filterForm.addEventListener("reset", function () { setTimeout(function () { load(false); }, 0); });
  more.addEventListener("click", function () { load(true); });
  loginForm.addEventListener("submit", function (ev) {
    ev.preventDefault();
    token = document.getElementById("token").value;
    sessionStorage.setItem("celery_dlq_token", token);
    loginForm.hidden = true;
    say("");
    load(false);
  });

  var initial = JSON.parse(document.getElementById("initial").textContent);
  if (initial) render(initial, false); else load(false);
})();
