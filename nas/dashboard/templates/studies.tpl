% rebase('base.tpl', title='Studies')
<h1>Studies</h1>
<p class="muted">State comes from trial heartbeats and the budget; this page refreshes itself.</p>
<div id="flash" role="status"></div>
<div data-live="/fragments/studies">
% include('studies_table.tpl')
</div>
