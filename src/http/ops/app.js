// The ops dashboard. The page itself carries no data: this script reads the admin API with the
// operator's bearer token (kept in this tab's sessionStorage, or taken once from `#token=…` in
// the address and then removed from it), renders queues, dead jobs, alarms and recent orders,
// and refreshes every few seconds. Everything is built with textContent, never innerHTML, so
// nothing the API returns (error texts, ids) can inject markup.
(() => {
  'use strict';

  const TOKEN_KEY = 'orderflow.ops.token';
  const INTERVAL_KEY = 'orderflow.ops.refresh';
  const DEAD_JOBS_SHOWN = 100;
  const ORDERS_SHOWN = 20;

  const $ = (id) => document.getElementById(id);
  let timer = null;
  let running = false;
  let refreshes = 0;

  class RequestFailed extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  const token = () => sessionStorage.getItem(TOKEN_KEY);

  /** `#token=…&refresh=N` (for bookmarks and tests): remembered, then removed from the address. */
  function takeFragment() {
    const fragment = location.hash.replace(/^#/, '');
    if (!fragment) return;
    const params = new URLSearchParams(fragment);
    if (params.get('token')) sessionStorage.setItem(TOKEN_KEY, params.get('token'));
    if (params.has('refresh')) sessionStorage.setItem(INTERVAL_KEY, params.get('refresh'));
    history.replaceState(null, '', location.pathname + location.search);
  }

  async function request(method, path, authorized = true) {
    const headers = { Accept: 'application/json' };
    if (authorized) headers.Authorization = 'Bearer ' + token();
    let response;
    try {
      response = await fetch(path, { method, headers, cache: 'no-store', credentials: 'omit' });
    } catch (error) {
      throw new RequestFailed(0, `${method} ${path}: the server did not answer (${error.message})`);
    }
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    return { response, body };
  }

  /** An admin API call: its JSON body, or a RequestFailed naming the status and problem detail. */
  async function api(method, path) {
    const { response, body } = await request(method, path);
    if (!response.ok) {
      const detail = (body && (body.detail || body.title)) || response.statusText;
      throw new RequestFailed(response.status, `${method} ${path}: ${response.status} ${detail}`);
    }
    return body;
  }

  /** Firing alarms from the readiness probe (it answers 503 with the same body when not ready). */
  async function readiness() {
    const { response, body } = await request('GET', '/health/ready', false);
    if (!body) throw new RequestFailed(response.status, `GET /health/ready: ${response.status}`);
    return body;
  }

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function row(cells) {
    const tr = document.createElement('tr');
    for (const cell of cells) tr.appendChild(cell);
    return tr;
  }

  function emptyRow(tbody, columns, text) {
    const td = el('td', text, 'empty');
    td.colSpan = columns;
    tbody.replaceChildren(row([td]));
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined) return '–';
    const s = Math.floor(seconds);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} m ${s % 60} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} m`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  /** An amount in its currency's own format (129 USD → $129.00), or as given if unknown. */
  function money(amount, currency) {
    try {
      return new Intl.NumberFormat(undefined, { style: 'currency', currency }).format(amount);
    } catch (_) {
      return `${amount} ${currency}`;
    }
  }

  function time(iso) {
    if (!iso) return '–';
    const date = new Date(iso);
    return isNaN(date) ? iso : date.toLocaleString();
  }

  function sectionError(id, error) {
    const node = $(id);
    node.hidden = !error;
    node.textContent = error ? `Could not refresh: ${error.message}` : '';
  }

  function renderQueues(queues) {
    const tbody = $('queues').tBodies[0];
    let ready = 0, running = 0, dead = 0, oldest = null;
    const rows = queues.data.map((q) => {
      ready += q.ready;
      running += q.running;
      dead += q.dead;
      if (q.oldest_ready_age_seconds !== null && (oldest === null || q.oldest_ready_age_seconds > oldest)) {
        oldest = q.oldest_ready_age_seconds;
      }
      const tr = row([
        el('td', q.kind, 'mono'),
        el('td', q.ready, 'n'),
        el('td', q.running, 'n'),
        el('td', q.dead, 'n'),
        el('td', q.succeeded, 'n'),
        el('td', age(q.oldest_ready_age_seconds), 'n'),
      ]);
      tr.dataset.step = q.kind;
      return tr;
    });
    if (rows.length) tbody.replaceChildren(...rows);
    else emptyRow(tbody, 6, 'No steps.');
    $('total-ready').textContent = ready;
    $('total-running').textContent = running;
    $('total-dead').textContent = dead;
    $('tile-dead').classList.toggle('bad', dead > 0);
    $('oldest-age').textContent = age(oldest);
  }

  function renderDeadJobs(jobs) {
    const tbody = $('dead-jobs').tBodies[0];
    const rows = jobs.data.map((job) => {
      const button = el('button', 'Replay', 'replay');
      button.type = 'button';
      button.dataset.jobId = job.job_id;
      button.title = 'Move this job back to ready (its history is kept)';
      const action = document.createElement('td');
      action.appendChild(button);
      const tr = row([
        el('td', job.job_id, 'mono'),
        el('td', job.kind, 'mono'),
        el('td', job.order_id || '–', 'mono'),
        el('td', `${job.attempts}/${job.max_attempts}`, 'n'),
        el('td', job.last_error || '–', 'err'),
        el('td', time(job.updated_at)),
        action,
      ]);
      tr.dataset.jobId = job.job_id;
      return tr;
    });
    if (rows.length) tbody.replaceChildren(...rows);
    else emptyRow(tbody, 7, 'No dead jobs.');
    if (jobs.next_cursor) {
      const td = el('td', `Showing the first ${DEAD_JOBS_SHOWN}; more are dead.`, 'empty');
      td.colSpan = 7;
      tbody.appendChild(row([td]));
    }
  }

  function renderAlarms(ready) {
    const list = $('alarms');
    if (!Array.isArray(ready.alarms)) {
      list.replaceChildren(el('li', 'This server does not report alarm states.', 'quiet'));
      $('alarm-count').textContent = '–';
      return;
    }
    const firing = ready.alarms.map((alarm) => {
      const name = alarm.step ? `${alarm.alarm} · ${alarm.step}` : alarm.alarm;
      const since = alarm.since ? ` — firing since ${time(alarm.since)}` : ' — firing';
      const li = el('li', name + since, 'firing');
      li.dataset.alarm = alarm.alarm;
      return li;
    });
    if (firing.length) list.replaceChildren(...firing);
    else list.replaceChildren(el('li', 'No alarm is firing.', 'quiet'));
    $('alarm-count').textContent = firing.length;
    $('tile-alarms').classList.toggle('bad', firing.length > 0);
  }

  function renderOrders(orders) {
    const tbody = $('orders').tBodies[0];
    const rows = orders.data.map((order) => {
      const tr = row([
        el('td', order.order_id, 'mono'),
        el('td', order.customer_id, 'mono'),
        el('td', order.status, 's-' + order.status),
        el('td', money(order.total_amount, order.currency), 'n'),
        el('td', time(order.created_at)),
        el('td', time(order.updated_at)),
      ]);
      tr.dataset.orderId = order.order_id;
      tr.dataset.status = order.status;
      return tr;
    });
    if (rows.length) tbody.replaceChildren(...rows);
    else emptyRow(tbody, 6, 'No orders.');
  }

  function setStatus(text, ok) {
    const status = $('status');
    status.textContent = text;
    status.className = 'status ' + (ok ? 'ok' : 'failed');
  }

  function showLogin(message) {
    $('dashboard').hidden = true;
    $('login').hidden = false;
    if (message) setStatus(message, false);
    else setStatus('Enter an admin token to load the dashboard.', true);
    $('token').focus();
  }

  function interval() {
    return Number($('interval').value) || 0;
  }

  function schedule() {
    clearTimeout(timer);
    timer = null;
    const seconds = interval();
    if (seconds > 0 && token()) timer = setTimeout(refresh, seconds * 1000);
  }

  async function refresh() {
    if (!token()) {
      showLogin();
      return;
    }
    if (running) return;
    running = true;
    clearTimeout(timer);
    const status = $('order-status').value;
    const ordersPath = `/admin/orders?limit=${ORDERS_SHOWN}` + (status ? `&status=${encodeURIComponent(status)}` : '');
    const [queues, jobs, orders, ready] = await Promise.allSettled([
      api('GET', '/admin/queues'),
      api('GET', `/admin/jobs?state=dead&limit=${DEAD_JOBS_SHOWN}`),
      api('GET', ordersPath),
      readiness(),
    ]);
    running = false;
    const failures = [queues, jobs, orders, ready].filter((r) => r.status === 'rejected').map((r) => r.reason);
    if (failures.some((error) => error.status === 401)) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin('The token was refused (401): enter a valid admin token.');
      return;
    }
    $('login').hidden = true;
    $('dashboard').hidden = false;
    const sections = [
      [queues, 'queues-error', renderQueues],
      [jobs, 'jobs-error', renderDeadJobs],
      [orders, 'orders-error', renderOrders],
      [ready, 'alarms-error', renderAlarms],
    ];
    for (const [result, errorId, render] of sections) {
      if (result.status === 'fulfilled') {
        sectionError(errorId, null);
        render(result.value);
      } else {
        sectionError(errorId, result.reason);
      }
    }
    refreshes += 1;
    document.body.dataset.refreshes = String(refreshes);
    const at = new Date().toLocaleTimeString();
    if (failures.length) {
      setStatus(`Refreshed at ${at} with ${failures.length} error(s): ${failures[0].message}`, false);
    } else {
      const every = interval() ? `every ${interval()} s` : 'paused';
      setStatus(`Updated ${at} (refreshing ${every})`, true);
    }
    schedule();
  }

  async function replay(button) {
    const id = button.dataset.jobId;
    button.disabled = true;
    const result = $('replay-result');
    try {
      await api('POST', `/admin/jobs/${encodeURIComponent(id)}/replay`);
      result.className = 'note';
      result.textContent = `Job ${id} replayed: it is ready to run again.`;
    } catch (error) {
      result.className = 'error';
      result.textContent = `Replay of job ${id} failed: ${error.message}`;
      button.disabled = false;
    }
    await refresh();
  }

  function start() {
    takeFragment();
    const saved = sessionStorage.getItem(INTERVAL_KEY);
    if (saved !== null && [...$('interval').options].some((o) => o.value === saved)) $('interval').value = saved;

    $('interval').addEventListener('change', () => {
      sessionStorage.setItem(INTERVAL_KEY, $('interval').value);
      schedule();
      refresh();
    });
    $('refresh-now').addEventListener('click', () => refresh());
    $('order-status').addEventListener('change', () => refresh());
    $('sign-out').addEventListener('click', () => {
      sessionStorage.removeItem(TOKEN_KEY);
      clearTimeout(timer);
      showLogin();
    });
    $('login').addEventListener('submit', (event) => {
      event.preventDefault();
      const value = $('token').value.trim();
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      $('token').value = '';
      refresh();
    });
    $('dead-jobs').addEventListener('click', (event) => {
      const button = event.target.closest('button.replay');
      if (button && !button.disabled) replay(button);
    });
    refresh();
  }

  start();
})();
