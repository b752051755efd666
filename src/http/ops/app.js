// The ops dashboard. The page itself carries no data: this script reads the admin API with the
// operator's bearer token (kept in this tab's sessionStorage, or taken once from `#token=…` in
// the address and then removed from it), renders queues, dead jobs, alarms, integrations (webhook
// endpoints with their delivery log, replay and enable/disable; the event feed's last position;
// the NATS backlog), a chart of the sales report (the last 24 hours or 30 days, drawn as SVG
// with no library) and recent orders, and refreshes every few seconds. Everything is built with
// textContent, never innerHTML, so nothing the API returns (error texts, URLs, the first bytes of
// a webhook receiver's answer) can inject markup.
(() => {
  'use strict';

  const TOKEN_KEY = 'orderflow.ops.token';
  const INTERVAL_KEY = 'orderflow.ops.refresh';
  const DEAD_JOBS_SHOWN = 100;
  const ORDERS_SHOWN = 20;
  const ENDPOINTS_SHOWN = 200;
  /** Deliveries listed per state. */
  const DELIVERIES_SHOWN = 100;
  const LATEST_EVENTS_SHOWN = 5;

  const $ = (id) => document.getElementById(id);
  let timer = null;
  let running = false;
  let again = false;
  let refreshes = 0;
  /** The webhook endpoints of the last refresh, by id, and their table rows (kept across refreshes). */
  const endpoints = new Map();
  const endpointRows = new Map();
  /** Endpoints whose enable/disable is in flight. */
  const toggling = new Set();
  /** The endpoint whose deliveries are shown, and a counter that drops answers overtaken by newer ones. */
  let selected = null;
  let deliveriesTicket = 0;
  /** What the feed showed so far: its last position and latest events (oldest first). */
  const feed = { last: null, latest: [] };

  class RequestFailed extends Error {
    constructor(status, message, problem) {
      super(message);
      this.status = status;
      this.problem = problem || null;
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

  /**
   * One call to this origin. `json` is sent as the JSON body; `text` reads the answer as text
   * (`/metrics`) unless it is an error, whose problem+json body is always read as JSON.
   */
  async function request(method, path, { authorized = true, json, text = false } = {}) {
    const headers = { Accept: text ? 'text/plain, application/problem+json' : 'application/json' };
    if (authorized) headers.Authorization = 'Bearer ' + token();
    const init = { method, headers, cache: 'no-store', credentials: 'omit' };
    if (json !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(json);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (error) {
      throw new RequestFailed(0, `${method} ${path}: the server did not answer (${error.message})`);
    }
    let body = null;
    try {
      body = text && response.ok ? await response.text() : await response.json();
    } catch (_) {
      body = null;
    }
    return { response, body };
  }

  /** An admin API call: its JSON body, or a RequestFailed naming the status and problem detail. */
  async function api(method, path, json, text = false) {
    const { response, body } = await request(method, path, { json, text });
    if (!response.ok) {
      const problem = body && typeof body === 'object' ? body : null;
      const detail = (problem && (problem.detail || problem.title)) || response.statusText;
      throw new RequestFailed(response.status, `${method} ${path}: ${response.status} ${detail}`, problem);
    }
    return body;
  }

  /** Firing alarms from the readiness probe (it answers 503 with the same body when not ready). */
  async function readiness() {
    const { response, body } = await request('GET', '/health/ready', { authorized: false });
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

  // ---------------------------------------------------------------------------------------------
  // Sales: `/admin/reports/sales` as a bar per period, gross (light) behind net (dark).

  const SVG_NS = 'http://www.w3.org/2000/svg';
  const CHART = { width: 720, height: 170, top: 8, bottom: 22 };

  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function periodLabel(iso, granularity) {
    const date = new Date(iso);
    if (isNaN(date)) return iso;
    return granularity === 'hour'
      ? date.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' })
      : date.toLocaleDateString(undefined, { month: 'short', day: 'numeric' });
  }

  function renderSales(report) {
    const { currency, granularity, totals } = report;
    const periods = report.data;
    const plot = CHART.height - CHART.top - CHART.bottom;
    const most = Math.max(0, ...periods.map((p) => Number(p.gross)));
    const slot = CHART.width / Math.max(periods.length, 1);
    const scale = (amount) => (most > 0 ? (Math.max(Number(amount), 0) / most) * plot : 0);
    const baseline = CHART.height - CHART.bottom;
    const nodes = [];
    periods.forEach((period, index) => {
      const x = index * slot + 1;
      const width = Math.max(slot - 2, 1);
      const gross = svg('rect', { class: 'gross', x, width, y: baseline - scale(period.gross), height: scale(period.gross) });
      gross.dataset.period = period.period_start;
      gross.dataset.orders = String(period.orders);
      gross.dataset.gross = String(period.gross);
      gross.dataset.net = String(period.net);
      gross.appendChild(svg('title', {}, `${periodLabel(period.period_start, granularity)}: ${period.orders} order(s), ` +
        `${period.units} unit(s), gross ${money(period.gross, currency)}, refunded ${money(period.refunded, currency)}, ` +
        `net ${money(period.net, currency)}`));
      nodes.push(gross, svg('rect', { class: 'net', x, width, y: baseline - scale(period.net), height: scale(period.net) }));
    });
    nodes.push(svg('line', { class: 'axis', x1: 0, x2: CHART.width, y1: baseline, y2: baseline }));
    if (periods.length) {
      nodes.push(svg('text', { x: 2, y: CHART.height - 6 }, periodLabel(periods[0].period_start, granularity)));
      nodes.push(svg('text', { x: CHART.width - 2, y: CHART.height - 6, 'text-anchor': 'end' },
        periodLabel(periods[periods.length - 1].period_start, granularity)));
    }
    if (most > 0) nodes.push(svg('text', { x: 2, y: CHART.top + 8 }, money(most, currency)));
    $('sales-chart').replaceChildren(...nodes);
    $('sales-summary').textContent = `${totals.orders} order(s) · ${totals.units} unit(s) · gross ` +
      `${money(totals.gross, currency)} · refunded ${money(totals.refunded, currency)} · net ${money(totals.net, currency)}`;
  }

  // ---------------------------------------------------------------------------------------------
  // Integrations: the event feed, the NATS backlog, webhook endpoints and their deliveries.

  /** `GET /events` after a position; `{ pruned: oldest }` when those events are past retention (410). */
  async function feedPage(after, limit) {
    try {
      return await api('GET', `/events?after=${after}&limit=${limit}`);
    } catch (error) {
      const oldest = error.problem && error.problem.oldest_position;
      if (error.status === 410 && Number.isInteger(oldest)) return { pruned: oldest };
      throw error;
    }
  }

  /**
   * The feed's last position (`head_position`, in every answer) and its latest events: one
   * one-event read for the head, one short page before it. Past retention (410), start at the
   * oldest position kept.
   */
  async function feedTail() {
    const read = async (after, limit) => {
      const page = await feedPage(after, limit);
      return page.pruned === undefined ? page : feedPage(page.pruned - 1, limit);
    };
    const head = (await read(feed.last || 0, 1)).head_position;
    const tail = await read(Math.max(0, head - LATEST_EVENTS_SHOWN), LATEST_EVENTS_SHOWN);
    if (tail.pruned !== undefined) throw new Error('GET /events: the feed was pruned while reading it');
    feed.latest = tail.data.slice(-LATEST_EVENTS_SHOWN);
    feed.last = Math.max(head, tail.head_position);
    return feed;
  }

  function renderFeed(state) {
    $('feed-position').textContent = state.last;
    $('replay-to').placeholder = `at most ${state.last}`;
    const tbody = $('latest-events').tBodies[0];
    const rows = state.latest
      .slice()
      .reverse()
      .map((event) => {
        const tr = row([
          el('td', event.position, 'n'),
          el('td', event.type, 'mono'),
          el('td', event.subject, 'mono'),
          el('td', event.sequence, 'n'),
          el('td', time(event.time)),
        ]);
        tr.dataset.position = String(event.position);
        tr.dataset.eventId = event.id;
        return tr;
      });
    if (rows.length) tbody.replaceChildren(...rows);
    else emptyRow(tbody, 5, 'No events yet.');
  }

  /** The NATS backlog from `/metrics` (its gauges exist only when NATS is configured). */
  async function natsBacklog() {
    const text = await api('GET', '/metrics', undefined, true);
    const value = (name) => {
      for (const line of String(text).split('\n')) {
        if (line.startsWith(name + '{') && line.includes('channel="nats"')) {
          const number = Number(line.slice(line.lastIndexOf('}') + 1).trim().split(' ')[0]);
          if (!isNaN(number)) return number;
        }
      }
      return null;
    };
    return {
      unpublished: value('orderflow_events_unpublished'),
      oldest: value('orderflow_events_oldest_unpublished_age_seconds'),
    };
  }

  function renderNats(backlog) {
    const node = $('nats-backlog');
    if (backlog.unpublished === null) {
      node.textContent = 'not configured';
      node.className = '';
    } else {
      node.textContent =
        backlog.unpublished > 0
          ? `${backlog.unpublished} unpublished, oldest ${age(backlog.oldest)}`
          : '0 unpublished';
      node.className = backlog.unpublished > 0 ? 'bad' : '';
    }
  }

  function endpointCell(field, className) {
    const td = el('td', null, className);
    td.dataset.field = field;
    return td;
  }

  function actionButton(action, id, text, title) {
    const button = el('button', text);
    button.type = 'button';
    button.dataset.action = action;
    button.dataset.endpointId = id;
    button.title = title;
    return button;
  }

  /** An endpoint's row, made once and then updated in place (its buttons keep focus across refreshes). */
  function endpointRow(id) {
    let tr = endpointRows.get(id);
    if (tr) return tr;
    const actions = endpointCell('actions', 'actions');
    actions.append(
      actionButton('toggle', id, 'Disable', ''),
      actionButton('deliveries', id, 'Deliveries', 'Show its failing and failed deliveries'),
      actionButton('replay', id, 'Replay…', 'Queue a position range of events to it again'),
    );
    tr = row([
      endpointCell('url', 'url'),
      endpointCell('events', 'mono'),
      endpointCell('status'),
      endpointCell('pending', 'n'),
      endpointCell('failing', 'n'),
      endpointCell('failed', 'n'),
      endpointCell('oldest', 'n'),
      endpointCell('failing-since'),
      actions,
    ]);
    tr.dataset.endpointId = id;
    endpointRows.set(id, tr);
    return tr;
  }

  function fill(cell, ...parts) {
    cell.replaceChildren(...parts.filter(Boolean));
  }

  function updateEndpointRow(tr, endpoint) {
    const cells = Object.fromEntries([...tr.cells].map((td) => [td.dataset.field, td]));
    const health = endpoint.health || {};
    const count = (n) => (n === undefined || n === null ? '–' : String(n));
    fill(
      cells.url,
      el('span', endpoint.url, 'mono'),
      endpoint.description ? el('span', endpoint.description, 'sub') : null,
    );
    cells.events.textContent = (endpoint.enabled_events || []).join(', ');
    fill(
      cells.status,
      el('span', endpoint.status, 'st-' + endpoint.status),
      endpoint.disabled_reason ? el('span', endpoint.disabled_reason, 'sub') : null,
    );
    cells.pending.textContent = count(health.pending);
    cells.failing.textContent = count(health.failing);
    cells.failing.classList.toggle('bad', health.failing > 0);
    cells.failed.textContent = count(health.failed);
    cells.failed.classList.toggle('bad', health.failed > 0);
    cells.oldest.textContent = age(health.oldest_pending_age_seconds);
    cells['failing-since'].textContent = time(health.failing_since);
    const toggle = cells.actions.querySelector('button[data-action=toggle]');
    const enabled = endpoint.status === 'enabled';
    toggle.textContent = enabled ? 'Disable' : 'Enable';
    toggle.dataset.next = enabled ? 'disabled' : 'enabled';
    toggle.className = enabled ? 'danger' : 'replay';
    toggle.title = enabled
      ? 'Stop delivering to it (its deliveries wait)'
      : 'Deliver to it again (its waiting deliveries resume)';
    toggle.disabled = toggling.has(endpoint.endpoint_id);
    tr.dataset.status = endpoint.status;
    tr.classList.toggle('selected', endpoint.endpoint_id === selected);
  }

  function renderEndpoints(list) {
    const tbody = $('webhook-endpoints').tBodies[0];
    endpoints.clear();
    let failures = 0;
    const rows = list.data.map((endpoint) => {
      endpoints.set(endpoint.endpoint_id, endpoint);
      const health = endpoint.health || {};
      failures += (health.failing || 0) + (health.failed || 0);
      const tr = endpointRow(endpoint.endpoint_id);
      updateEndpointRow(tr, endpoint);
      return tr;
    });
    for (const id of [...endpointRows.keys()]) {
      if (!endpoints.has(id)) endpointRows.delete(id);
    }
    if (!rows.length) {
      emptyRow(tbody, 9, 'No webhook endpoints.');
    } else {
      // Rows move only when their place changes: a focused button stays focused.
      rows.forEach((tr, index) => {
        if (tbody.children[index] !== tr) tbody.insertBefore(tr, tbody.children[index] || null);
      });
      while (tbody.children.length > rows.length) tbody.lastElementChild.remove();
      if (list.next_cursor) {
        const td = el('td', `Showing the first ${ENDPOINTS_SHOWN} endpoints.`, 'empty');
        td.colSpan = 9;
        tbody.appendChild(row([td]));
      }
    }
    $('endpoint-count').textContent = list.data.length + (list.next_cursor ? '+' : '');
    $('webhook-failures').textContent = failures;
    $('tile-webhooks').classList.toggle('bad', failures > 0);
    if (selected && !endpoints.has(selected)) {
      closeDetail();
      const result = $('endpoint-result');
      result.className = 'note';
      result.textContent = 'The endpoint whose deliveries were shown no longer exists.';
    } else if (selected) {
      $('detail-url').textContent = endpoints.get(selected).url;
    }
  }

  async function deliveryPage(id, state, limit, cursor) {
    const query = `state=${state}&limit=${limit}` + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : '');
    return api('GET', `/admin/webhook-endpoints/${encodeURIComponent(id)}/deliveries?${query}`);
  }

  /** The deliveries to show: one state, or (`problems`) the failing and the failed ones. */
  async function fetchDeliveries(id, state) {
    if (state !== 'problems') {
      const page = await deliveryPage(id, state, DELIVERIES_SHOWN);
      return { rows: page.data, more: Boolean(page.next_cursor) };
    }
    const [failing, failed] = await Promise.all([
      deliveryPage(id, 'failing', DELIVERIES_SHOWN),
      deliveryPage(id, 'failed', DELIVERIES_SHOWN),
    ]);
    const rows = failing.data
      .concat(failed.data)
      .sort((a, b) => (a.delivery_id < b.delivery_id ? 1 : a.delivery_id > b.delivery_id ? -1 : 0));
    return {
      rows: rows.slice(0, DELIVERIES_SHOWN),
      more: rows.length > DELIVERIES_SHOWN || Boolean(failing.next_cursor) || Boolean(failed.next_cursor),
    };
  }

  function renderDeliveries(result) {
    const tbody = $('webhook-deliveries').tBodies[0];
    const endpoint = endpoints.get(selected);
    const waits = endpoint && endpoint.status === 'disabled';
    const rows = result.rows.map((delivery) => {
      const last = delivery.attempt_log.length ? delivery.attempt_log[delivery.attempt_log.length - 1] : null;
      const state = delivery.state === 'pending' && delivery.attempts > 0 ? 'failing' : delivery.state;
      let next = '–';
      if (delivery.state === 'pending') next = waits ? 'waits (endpoint disabled)' : time(delivery.next_attempt_at);
      const event = el('td');
      event.append(el('span', delivery.event_type, 'mono'), el('span', `${delivery.subject} #${delivery.sequence}`, 'sub'));
      const cell = (field, text, className) => {
        const td = el('td', text, className);
        td.dataset.field = field;
        return td;
      };
      const tr = row([
        event,
        cell('position', delivery.position, 'n'),
        cell('state', state, 'd-' + state),
        cell('attempts', delivery.attempts, 'n'),
        cell('attempted', last ? time(last.attempted_at) : '–'),
        cell('status', last ? (last.status_code === null ? 'no answer' : last.status_code) : '–', 'n'),
        cell('latency', last ? `${last.latency_ms} ms` : '–', 'n'),
        cell('error', (last && last.error) || '–', 'err'),
        cell('excerpt', (last && last.response_excerpt) || '–', 'excerpt mono'),
        cell('next', next),
      ]);
      tr.dataset.deliveryId = delivery.delivery_id;
      tr.dataset.eventId = delivery.event_id;
      tr.dataset.state = state;
      return tr;
    });
    if (rows.length) tbody.replaceChildren(...rows);
    else {
      const what = $('delivery-state').selectedOptions[0].textContent;
      emptyRow(tbody, 10, `No ${what} deliveries.`);
    }
    if (result.more) {
      const td = el('td', `Showing the newest ${rows.length}; there are more.`, 'empty');
      td.colSpan = 10;
      tbody.appendChild(row([td]));
    }
  }

  /** The selected endpoint's deliveries (an answer overtaken by a newer request is dropped). */
  async function loadDeliveries() {
    if (!selected) return;
    const ticket = ++deliveriesTicket;
    const id = selected;
    try {
      const result = await fetchDeliveries(id, $('delivery-state').value);
      if (ticket !== deliveriesTicket || id !== selected) return;
      sectionError('deliveries-error', null);
      renderDeliveries(result);
    } catch (error) {
      if (ticket !== deliveriesTicket || id !== selected) return;
      sectionError('deliveries-error', error);
      throw error;
    }
  }

  function openDetail(id, replay) {
    const endpoint = endpoints.get(id);
    if (!endpoint) return;
    if (selected !== id) {
      $('webhook-replay-result').textContent = '';
      $('webhook-deliveries').tBodies[0].replaceChildren();
      sectionError('deliveries-error', null);
    }
    selected = id;
    $('detail-url').textContent = endpoint.url;
    $('endpoint-detail').hidden = false;
    for (const [rowId, tr] of endpointRows) tr.classList.toggle('selected', rowId === id);
    if (replay) $('replay-from').focus();
    loadDeliveries().catch(() => {});
  }

  function closeDetail() {
    selected = null;
    deliveriesTicket += 1;
    $('endpoint-detail').hidden = true;
    for (const tr of endpointRows.values()) tr.classList.remove('selected');
  }

  async function toggleEndpoint(button) {
    const id = button.dataset.endpointId;
    const next = button.dataset.next;
    const url = endpoints.has(id) ? endpoints.get(id).url : id;
    const result = $('endpoint-result');
    toggling.add(id);
    button.disabled = true;
    try {
      await api('PATCH', `/admin/webhook-endpoints/${encodeURIComponent(id)}`, { status: next });
      result.className = 'note';
      result.textContent =
        next === 'disabled'
          ? `Endpoint ${url} disabled: its deliveries wait until it is enabled again.`
          : `Endpoint ${url} enabled: its waiting deliveries resume.`;
    } catch (error) {
      result.className = 'error';
      result.textContent = `Could not ${next === 'disabled' ? 'disable' : 'enable'} endpoint ${url}: ${error.message}`;
    } finally {
      toggling.delete(id);
      button.disabled = false;
    }
    await refresh();
  }

  /** A problem's field errors, for the replay form (`/to_position: must be at least from_position`). */
  function fieldErrors(error) {
    const errors = (error.problem && Array.isArray(error.problem.errors) && error.problem.errors) || [];
    const named = errors.filter((e) => e && e.field).map((e) => `${e.field}: ${e.message}`);
    return named.length ? ` (${named.join('; ')})` : '';
  }

  async function replayEndpoint(form) {
    const id = selected;
    if (!id) return;
    const url = endpoints.has(id) ? endpoints.get(id).url : id;
    const result = $('webhook-replay-result');
    const from = $('replay-from').value.trim();
    const to = $('replay-to').value.trim();
    delete result.dataset.queued;
    if (!/^\d+$/.test(from) || !/^\d+$/.test(to)) {
      result.className = 'error';
      result.textContent = 'Give the first and last positions to replay as whole numbers.';
      return;
    }
    const submit = form.querySelector('button[type=submit]');
    submit.disabled = true;
    result.className = 'note';
    result.textContent = `Replaying positions ${from}–${to} to ${url}…`;
    try {
      const answer = await api('POST', `/admin/webhook-endpoints/${encodeURIComponent(id)}/replay`, {
        from_position: Number(from),
        to_position: Number(to),
      });
      result.className = 'note';
      result.dataset.queued = String(answer.queued);
      result.textContent = `Replay of positions ${from}–${to} to ${url}: queued ${answer.queued} ${
        answer.queued === 1 ? 'delivery' : 'deliveries'
      }.`;
    } catch (error) {
      result.className = 'error';
      result.textContent = `Replay to ${url} failed: ${error.message}${fieldErrors(error)}`;
    } finally {
      submit.disabled = false;
    }
    await refresh();
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
    if (running) {
      // Asked again (after an action) while a refresh is under way: run once more after it.
      again = true;
      return;
    }
    running = true;
    again = false;
    clearTimeout(timer);
    const status = $('order-status').value;
    const ordersPath = `/admin/orders?limit=${ORDERS_SHOWN}` + (status ? `&status=${encodeURIComponent(status)}` : '');
    const [queues, jobs, orders, ready, hooks, events, nats, sales] = await Promise.allSettled([
      api('GET', '/admin/queues'),
      api('GET', `/admin/jobs?state=dead&limit=${DEAD_JOBS_SHOWN}`),
      api('GET', ordersPath),
      readiness(),
      api('GET', `/admin/webhook-endpoints?limit=${ENDPOINTS_SHOWN}`),
      feedTail(),
      natsBacklog(),
      api('GET', `/admin/reports/sales?granularity=${encodeURIComponent($('sales-range').value)}`),
    ]);
    const results = [queues, jobs, orders, ready, hooks, events, nats, sales];
    const failures = results.filter((r) => r.status === 'rejected').map((r) => r.reason);
    if (failures.some((error) => error.status === 401)) {
      running = false;
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
      [hooks, 'endpoints-error', renderEndpoints],
      [events, 'feed-error', renderFeed],
      [nats, 'nats-error', renderNats],
      [sales, 'sales-error', renderSales],
    ];
    for (const [result, errorId, render] of sections) {
      if (result.status === 'fulfilled') {
        sectionError(errorId, null);
        render(result.value);
      } else {
        sectionError(errorId, result.reason);
      }
    }
    // The open delivery log, after the endpoints (whose failing counts it looks for).
    if (selected) {
      try {
        await loadDeliveries();
      } catch (error) {
        failures.push(error);
      }
    }
    running = false;
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
    if (again) refresh();
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
    $('sales-range').addEventListener('change', () => refresh());
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
    $('webhook-endpoints').addEventListener('click', (event) => {
      const button = event.target.closest('button[data-action]');
      if (!button || button.disabled) return;
      const id = button.dataset.endpointId;
      if (button.dataset.action === 'toggle') toggleEndpoint(button);
      else if (button.dataset.action === 'deliveries') openDetail(id, false);
      else if (button.dataset.action === 'replay') openDetail(id, true);
    });
    $('delivery-state').addEventListener('change', () => loadDeliveries().catch(() => {}));
    $('detail-close').addEventListener('click', () => closeDetail());
    $('webhook-replay').addEventListener('submit', (event) => {
      event.preventDefault();
      replayEndpoint(event.currentTarget);
    });
    refresh();
  }

  start();
})();
